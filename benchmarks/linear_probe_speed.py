"""Seconds of CPU time for the linear probe on 5,000 x 512 features, 100 epochs (target: < 5 s).

    python benchmarks/linear_probe_speed.py

CPU time of this process, so other processes sharing the machine count less; still a benchmark,
not a test: timings swing with the machine.
"""

import time

import torch

from sslens.evaluate import linear_probe


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(5000, 512, generator=generator), torch.randn(500, 512, generator=generator)
    train_y = torch.randint(0, 10, (5000,), generator=generator)
    test_y = torch.randint(0, 10, (500,), generator=generator)
    started = time.process_time()
    linear_probe(train_x, train_y, test_x, test_y, num_classes=10, epochs=100)
    print(f"linear probe, 5000 x 512 features, 100 epochs: {time.process_time() - started:.2f} s CPU time "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
