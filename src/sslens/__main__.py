from sslens.cli import main

main()
