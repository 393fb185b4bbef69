"""Models that leave the studio: a trained run as an ONNX or TorchScript file that carries what
a consumer needs (classes, input size, preprocessing, accuracy, run id).

The exported network is the classifier with its softmax: input "input", float32
(batch, C, S, S), the face already preprocessed (`preprocessing`); output "probabilities"
(batch, classes). The batch dimension is dynamic. Test-time augmentation is not part of the
file: it averages several views of the input, which our `Predictor` does around any backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, settings
from .calibration import Calibration
from .errors import CheckpointError, FerError
from .image_format import DEFAULT_FORMAT, ImageFormat
from .models import load_checkpoint, model_from_checkpoint
from .runs import (CHECKPOINT_DIR, RunLayout, atomic_write_bytes, atomic_write_json, evaluation_problem,
                   read_json_object)
from .transforms import channel_statistics

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
OPSET = 18
"""ONNX opset 18 (ONNX 1.13, 2022): the newest opset torch's exporter translates natively, and one
every ONNX Runtime from 1.14 on runs."""
INPUT_NAME, OUTPUT_NAME = "input", "probabilities"
CARD_FORMAT = "fer_core.model_card/1"
CARD_SUFFIX = ".json"
CACHED_EXPORTS = 8  # ONNX exports of checkpoints kept in the cache folder
METADATA_KEY = "fer_model_card"
"""The ONNX metadata_props key (and TorchScript extra file name) holding the model card JSON;
its fields are also stored one per key (`fer.<field>`) for tools that show metadata as a table."""


def preprocessing(image_format: ImageFormat) -> dict[str, Any]:
    """How a client turns a face into the model's input, for a run that stored `image_format`."""
    side, grey = image_format.size, image_format.colour == "grey"
    mean, std = channel_statistics(image_format.channels)
    colour = "convert it to grey (ITU-R 601-2 luma)" if grey else "keep it RGB"
    return {
        "description": (f"Crop the face, {colour}, take the centre square and resize it to {side}x{side} "
                        "(bilinear): that is how every training image was stored. Then resize to "
                        "input_size x input_size (bilinear, antialiased when shrinking), scale to [0, 1] "
                        f"and normalise {'the channel' if grey else 'each channel'} with mean and std. "
                        "Layout NCHW, float32."),
        "face_size": side, "colour": image_format.colour, "resize": "bilinear", "scale": 1 / 255,
        "channels": image_format.channels, "mean": list(mean), "std": list(std), "layout": "NCHW",
        "dtype": "float32",
    }


@dataclass(frozen=True)
class ModelCard:
    """What a consumer of an exported model needs to use it correctly, and where it came from."""

    classes: list[str]
    input_size: int
    run_id: str | None
    test_accuracy: float | None
    macro_f1: float | None
    tta: bool
    stem: str
    format: str
    opset: int | None
    exported_at: str
    source_checkpoint: str
    # temperature scaling fitted on the validation split (fer_core.calibration); None: uncalibrated.
    # The graph outputs the plain softmax p: calibrated = softmax(log(p) / temperature).
    calibration: dict[str, Any] | None = None
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=lambda: preprocessing(DEFAULT_FORMAT))
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    fer_core_version: str = __version__
    torch_version: str = torch.__version__
    card_format: str = CARD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def image_format(self) -> ImageFormat:
        """How the run stored its faces (cards from before the choice: 48 px grey)."""
        described = self.preprocessing if isinstance(self.preprocessing, dict) else {}
        return ImageFormat(size=described.get("face_size", DEFAULT_FORMAT.size),
                           colour=described.get("colour", DEFAULT_FORMAT.colour))

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """A card read back from a file; CheckpointError when it is not one of ours."""
        if not isinstance(data, dict) or data.get("card_format") != CARD_FORMAT:
            raise CheckpointError("the model has no fer_core model card (it was not exported by fer_core)")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            card = cls(**{key: value for key, value in data.items() if key in known})
        except TypeError as exc:
            raise CheckpointError(f"the model card is incomplete: {exc}") from exc
        classes = card.classes
        if (not isinstance(classes, list) or not classes or len(set(classes)) != len(classes)
                or not all(isinstance(name, str) and name for name in classes)):
            raise CheckpointError("the model card's classes must be a non-empty list of distinct names")
        size = card.input_size
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1024:
            raise CheckpointError(f"the model card's input_size must be an int in [16, 1024], got {card.input_size!r}")
        try:
            _ = card.image_format  # a size or colour no stored face can have
        except ValueError as exc:
            raise CheckpointError(f"the model card's preprocessing is not usable: {exc}") from exc
        return card


@dataclass(frozen=True)
class ExportResult:
    path: Path
    card_path: Path
    card: ModelCard


def default_output(source: Path, fmt: str) -> Path:
    """<run>/exports/model<suffix> for a run folder; beside the file for a checkpoint."""
    if source.is_dir():
        return RunLayout(source).export_file(SUFFIXES[fmt])
    return source.with_name(source.name.removesuffix(".pt") + SUFFIXES[fmt])


def is_current(exported: Path, checkpoint: Path) -> bool:
    """True when `exported` exists and is no older than the checkpoint it was made from (a
    resumed run writes a newer best model, and its old export must not be offered as current)."""
    try:
        return exported.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns
    except OSError:
        return False


def card_path_for(model_path: Path) -> Path:
    """The model card JSON beside an exported model: model.onnx -> model.onnx.json."""
    return model_path.with_name(model_path.name + CARD_SUFFIX)


def load_exportable(source: Path) -> tuple[dict[str, Any], str | None]:
    """The checkpoint to export and its run id, from a run folder (its best model and test
    result) or a .pt file (a published checkpoint carries both)."""
    source = Path(source)
    if source.is_dir():
        layout = RunLayout.of(source)
        if not layout.best_checkpoint.is_file():
            raise FerError(f"{source} has no best model yet ({CHECKPOINT_DIR}/best.pt): "
                           "export a run once it has finished an epoch")
        checkpoint = load_checkpoint(layout.best_checkpoint)
        # a run stopped before its test evaluation (or with a damaged one) exports without scores
        evaluation, problem = read_json_object(layout.evaluation_file())
        if evaluation is not None and not problem and evaluation_problem(evaluation) is None:
            checkpoint["evaluation"] = evaluation
        return checkpoint, layout.id
    checkpoint = load_checkpoint(source)
    from .predict import describe_checkpoint  # its checks, before the card reads the same fields
    describe_checkpoint(checkpoint)
    run_dir = checkpoint.get("run_dir")
    run_id = None
    if isinstance(run_dir, str):
        try:
            run_id = RunLayout.of(run_dir).id
        except FerError:
            run_id = None
    return checkpoint, run_id


def export_model(source: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> ExportResult:
    """Export a run's best model (or a checkpoint) as `fmt`, on the CPU, with its model card both
    inside the file and beside it (`<name>.card.json`). Both writes are atomic."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    source = Path(source)
    if not source.exists():
        raise FerError(f"nothing to export at {source}: give a run folder or a .pt checkpoint")
    checkpoint, run_id = load_exportable(source)
    network = exportable_network(checkpoint)  # first: a checkpoint from elsewhere is refused in words
    card = _card(checkpoint, run_id, fmt, source)
    target = Path(out) if out is not None else default_output(source, fmt)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = _onnx_bytes(network, card) if fmt == "onnx" else _torchscript_bytes(network, card)
    atomic_write_bytes(target, payload)
    card_file = card_path_for(target)
    atomic_write_json(card_file, card.to_dict())
    return ExportResult(path=target, card_path=card_file, card=card)


def exportable_network(checkpoint: dict[str, Any]) -> nn.Module:
    """The checkpoint's classifier followed by its softmax, in eval mode on the CPU."""
    return nn.Sequential(model_from_checkpoint(checkpoint), nn.Softmax(dim=1)).eval()


def cached_onnx_export(checkpoint: str | Path) -> Path:
    """The ONNX export of a .pt checkpoint, made once per checkpoint content and kept in the
    cache folder (FER_CACHE_DIR/onnx), so running a checkpoint on ONNX Runtime costs the export
    (seconds) only the first time."""
    checkpoint = Path(checkpoint)
    try:
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:24]
    except OSError as exc:
        raise CheckpointError(f"checkpoint not found or unreadable: {checkpoint} ({exc.strerror or exc})") from exc
    target = settings.cache_dir() / "onnx" / f"{digest}.onnx"
    if not target.is_file():
        export_model(checkpoint, "onnx", target)
        _prune_cache(target.parent, keep=CACHED_EXPORTS)
    return target


def _prune_cache(folder: Path, keep: int) -> None:
    """Delete all but the `keep` newest cached exports (and their cards): each is as large as
    its checkpoint."""
    exports = sorted(folder.glob("*.onnx"), key=lambda path: path.stat().st_mtime_ns, reverse=True)
    for stale in exports[keep:]:
        for path in (stale, card_path_for(stale)):
            path.unlink(missing_ok=True)


def example_input(card: ModelCard, batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, card.image_format.channels, card.input_size, card.input_size)


def _card(checkpoint: dict[str, Any], run_id: str | None, fmt: str, source: Path) -> ModelCard:
    config = checkpoint["config"] if isinstance(checkpoint.get("config"), dict) else {}
    evaluation = checkpoint.get("evaluation") if isinstance(checkpoint.get("evaluation"), dict) else {}
    img_size = config.get("img_size")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not 16 <= img_size <= 1024:
        raise CheckpointError(f"checkpoint config img_size must be an int in [16, 1024], got {img_size!r}")
    return ModelCard(
        classes=list(checkpoint["class_names"]), input_size=img_size, run_id=run_id,
        test_accuracy=_number(evaluation.get("accuracy")), macro_f1=_number(evaluation.get("macro_f1")),
        tta=bool(config.get("tta", False)), stem=str(config.get("stem", "imagenet")), format=fmt,
        opset=OPSET if fmt == "onnx" else None,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source_checkpoint=str(source), calibration=_calibration_of(checkpoint),
        preprocessing=preprocessing(ImageFormat.of(config)))


def _calibration_of(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    calibration = Calibration.from_dict(checkpoint.get("calibration"))
    return calibration.to_dict() if calibration else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _onnx_bytes(network: nn.Module, card: ModelCard) -> bytes:
    import onnx  # imported here: the app and training never need it

    batch = torch.export.Dim("batch", min=1, max=4096)
    # the exporter narrates each step on stdout and in warnings (a CLI's stdout is its own
    # output); failures still raise
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(network, (example_input(card),), input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                    opset_version=OPSET, dynamo=True, verbose=False)
    model = program.model_proto
    channels = card.image_format.channels
    model.doc_string = (f"Facial emotion classifier ({len(card.classes)} classes: "
                        f"{', '.join(card.classes)}). Input {INPUT_NAME}: float32 (batch, {channels}, "
                        f"{card.input_size}, {card.input_size}), preprocessed as the model card says. "
                        f"Output {OUTPUT_NAME}: softmax probabilities in class order.")
    model.producer_name, model.producer_version = "fer_core", __version__
    metadata = {METADATA_KEY: json.dumps(card.to_dict())}
    metadata.update({f"fer.{key}": value if isinstance(value, str) else json.dumps(value)
                     for key, value in card.to_dict().items()})
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _torchscript_bytes(network: nn.Module, card: ModelCard) -> bytes:
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, yet TorchScript is still what C++
        # (libtorch) and older serving stacks load
        warnings.simplefilter("ignore")
        with torch.inference_mode(False), torch.no_grad():
            scripted = torch.jit.trace(network, example_input(card), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={METADATA_KEY + ".json": json.dumps(card.to_dict())})
    return buffer.getvalue()


def read_card(model_path: str | Path) -> ModelCard:
    """The model card stored inside an exported .onnx or TorchScript file."""
    path = Path(model_path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        import onnx
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise CheckpointError(f"{path.name} is not a readable ONNX model ({type(exc).__name__})") from exc
        raw = {entry.key: entry.value for entry in model.metadata_props}.get(METADATA_KEY)
    else:
        extra = {METADATA_KEY + ".json": ""}
        try:
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise CheckpointError(f"{path.name} is not a readable TorchScript model ({type(exc).__name__})") from exc
        raw = extra[METADATA_KEY + ".json"] or None
    if raw is None:
        raise CheckpointError(f"{path.name} has no fer_core model card: it was not exported by fer_core")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path.name}: its model card is not valid JSON") from exc
    return ModelCard.from_dict(data)
