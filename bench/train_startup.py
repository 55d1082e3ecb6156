"""What a Ray Train run costs before any of this project's code runs: an empty `train_loop_per_worker`
on a fresh local Ray (2 CPUs), one gloo worker, `fit()` three times. Prints each fit's seconds and when
its worker's loop started, from the call to `fit()`.

    python bench/train_startup.py
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as the test suite sets it


def empty_loop(config: dict) -> None:
    with open(config["marks"], "a") as f:
        f.write(f"{time.time()}\n")


def main() -> None:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        marks = os.path.join(tmp, "marks")
        for i in range(3):
            start = time.time()
            TorchTrainer(
                empty_loop, train_loop_config={"marks": marks},
                scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                run_config=ray.train.RunConfig(name=f"empty{i}", storage_path=os.path.join(tmp, "runs")),
                torch_config=TorchConfig(backend="gloo"),
            ).fit()
            worker = float(open(marks).read().split()[-1]) - start
            print(f"fit {i}: {time.time() - start:.1f} s, the worker's loop started at +{worker:.1f} s", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
