"""Parquet datasets shaped like those on the Hugging Face Hub, written by pyarrow (snappy),
for kiln's Parquet reader tests: tests/fixtures/data/{chat,prompt_completion}.parquet.

Run:  python tools/golden/parquet_rows.py   (needs pyarrow)
"""

import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "data"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    chats = [
        [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
        for a, b in [(1, 2), (3, 4), (10, 5), (7, 7)]
    ]
    pq.write_table(pa.table({"messages": chats, "source": ["synthetic"] * len(chats)}), OUT / "chat.parquet", compression="snappy")
    pq.write_table(
        pa.table({"prompt": ["2+2=", "5-3="], "completion": ["4", "2"]}),
        OUT / "prompt_completion.parquet",
        compression="snappy",
    )
    print("written", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
