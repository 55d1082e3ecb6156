"""Reproduces a hang found while merging the fault tests (session 9; fixed in session 10): Ray Data
(Ray 2.60) runs its Parquet footer readers, its read tasks and even `from_arrow`'s metadata tasks at a
whole CPU each, so when other actors leave less than one CPU free, a read never starts and waits
without a word, whatever `num_cpus` the read is given. `trainer.training_dataset` read this way after
the teacher and critic actors were placed; it now reads small datasets with pyarrow and hands Ray the
tables through `from_blocks`, whose metadata is computed in the caller (`blocks` below).

    python bench/parquet_read_starved.py 0.9 parquet    # 1.1 CPUs free: reads in seconds
    python bench/parquet_read_starved.py 1.05 parquet   # 0.95 CPUs free: hangs (run it under `timeout 60`)
    python bench/parquet_read_starved.py 1.05 arrow     # pyarrow, then from_arrow: hangs too
    python bench/parquet_read_starved.py 1.25 blocks    # pyarrow, then from_blocks: reads at once
    python bench/parquet_read_starved.py 1.25 items     # from_items, 0.75 free: reads at once
"""

import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data


def main(held_cpus: float, source: str) -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.options(num_cpus=held_cpus).remote()
    ray.get(holder.ping.remote())
    folder = tempfile.mkdtemp()
    pq.write_table(pa.table({"id": ["a", "b"], "x": [1, 2]}), f"{folder}/part-0.parquet")
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.time()
    dataset = {
        "items": lambda: ray.data.from_items([{"a": 1}]),
        "parquet": lambda: ray.data.read_parquet(folder, num_cpus=0.1),
        "arrow": lambda: ray.data.from_arrow([pq.read_table(f"{folder}/part-0.parquet")]),
        "blocks": lambda: ray.data.from_blocks([pq.read_table(f"{folder}/part-0.parquet")]),
    }[source]()
    print(f"{held_cpus} CPUs held, {source}: {dataset.materialize().count()} rows in {time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2])
