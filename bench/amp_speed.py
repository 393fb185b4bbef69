"""Training-step speed in float32 and in bfloat16 autocast on this CPU: whether mixed precision
pays here, which is what `inference.amp_dtype` decides from the CPU's flags.

Only the network's step (forward, loss, backward, SGD update) of cpu-fast's shape: the small
stem at 48 px, grey faces, batch 128, channels_last, on random faces (speed does not depend on
the pixels). No data pipeline and no augmentation, so it is an upper bound on what the trainer
reads. The two precisions alternate, round by round, so that a shared machine's noise falls on
both alike; each round times `--steps` steps after one warm-up step.

    .venv/bin/python bench/amp_speed.py [--rounds 3] [--steps 5] [--threads 2]

The last line is machine readable: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from fer_core.inference import amp_dtype, cpu_has_fast_bfloat16
from fer_core.models import build_model

BATCH, SIDE, CLASSES = 128, 48, 7


def step_speed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype | None,
               steps: int) -> float:
    """Images a second through `steps` training steps, after one untimed warm-up step."""
    faces = torch.randn(BATCH, 1, SIDE, SIDE).to(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (BATCH,))

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(faces).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return BATCH * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, _ = build_model(CLASSES, "finetune", stem="small", pretrained=False, in_channels=1)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    speeds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for round_number in range(args.rounds):
        order = ("float32", "bfloat16") if round_number % 2 == 0 else ("bfloat16", "float32")
        for name in order:
            speeds[name].append(step_speed(model, optimizer, None if name == "float32" else torch.bfloat16,
                                           args.steps))
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    chosen = amp_dtype(torch.device("cpu"), True)
    print(f"torch threads {torch.get_num_threads()}, native bfloat16: {cpu_has_fast_bfloat16()}, "
          f"the trainer's AMP here: {chosen}")
    for name, values in speeds.items():
        print(f"{name:9} {medians[name]:7.1f} img/s (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    ratio = medians["bfloat16"] / medians["float32"]
    print(f"bfloat16 / float32: {ratio:.2f}x")
    print("RESULT " + json.dumps({"float32_img_s": round(medians["float32"], 1),
                                  "bfloat16_img_s": round(medians["bfloat16"], 1),
                                  "bfloat16_over_float32": round(ratio, 2),
                                  "native_bfloat16": cpu_has_fast_bfloat16(),
                                  "trainer_amp": str(chosen) if chosen else None,
                                  "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
