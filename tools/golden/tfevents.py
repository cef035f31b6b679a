"""A TensorBoard event file written by PyTorch's SummaryWriter (what HF's TensorBoardCallback
uses), for kiln's event writer and reader to be checked against: a run resumed at step 4
(purge_step: TensorBoard drops what an earlier attempt logged from step 4 on), then scalars
under the names HF's callback gives them (`train/<key>`, `eval/<key>`).

Writes tests/fixtures/tensorboard/events.out.tfevents.golden and, beside it, scalars.json
(the (tag, step, value) triples as written, for the test to expect).

Run:  python tools/golden/tfevents.py   (needs torch and tensorboard)
"""

import json
import pathlib
import shutil
import tempfile

from torch.utils.tensorboard import SummaryWriter

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "tensorboard"

SCALARS = [("train/learning_rate", 4, 1e-3), ("train/loss", 4, 1.5), ("eval/loss", 4, 2.25), ("train/loss", 5, -0.375)]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp, purge_step=4)
        for tag, step, value in SCALARS:
            writer.add_scalar(tag, value, step)
        writer.close()
        (written,) = pathlib.Path(tmp).glob("events.out.tfevents.*")
        shutil.copy(written, OUT / "events.out.tfevents.golden")
    (OUT / "scalars.json").write_text(json.dumps([list(s) for s in SCALARS], indent=1) + "\n")


if __name__ == "__main__":
    main()
