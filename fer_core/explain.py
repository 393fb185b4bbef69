"""Why did the model say "sad"? Grad-CAM heat maps over the 48x48 face and over its box in the photo.

The method is Captum's (`captum.attr.LayerGradCam`, upsampled with `LayerAttribution.interpolate`);
this module only feeds it exactly what prediction feeds the model (`pixels.to_stored`, then
`transforms.eval_transform` at the checkpoint's img_size), picks the layer, and paints the result.

Which layer: Grad-CAM's map has the resolution of the layer it reads, and ResNet18 halves it in
each of layer2-4. With the small stem at 48 px (the demo-quick and cpu-fast recipes) layer4's map
is 3x3: one row for the whole lower face, too coarse to tell the mouth from the cheeks. layer3's
is 6x6 (8 px cells of the 48 px face), still one block before the classifier (its features feed
only layer4 and the pooled head), so it keeps Grad-CAM's class specificity. Hence `layer_for`:
layer4 where its map is at least MIN_MAP_SIDE cells a side (large inputs, e.g. 224 px with the
ImageNet stem: 7x7), else layer3. `tests/test_explain.py` checks the choice on a model whose only
signal is the mouth: layer3's maps put 61% of their mass on the lower-middle 28% of the face,
layer4's 38% (a map blind to position: 28%).

What is explained: the model's output for the class (its logit; an ensemble's averaged log
probability, summing each member's map), on the single centred view of the face, in float32.
A calibration temperature divides every gradient alike, so it does not change the scaled map.

Colours: `heat_colours` paints 0 (no evidence for the class) dark blue through green and yellow
to dark red (the strongest evidence), matplotlib's "turbo" map. Each map is scaled to its own
maximum, so colours compare places within one map, not across faces or classes.

Captum is imported only when a map is computed: importing this module costs nothing.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import FerError
from .image_format import DEFAULT_FORMAT, ImageFormat
from .pixels import to_stored
from .transforms import eval_transform

if TYPE_CHECKING:
    from .faces import FaceBox
    from .predict import Predictor

LAYERS = ("layer3", "layer4")
"""The blocks Grad-CAM may read, shallowest first (torchvision ResNet attribute names)."""
MIN_MAP_SIDE = 6
"""layer4 is used when its feature map is at least this many cells a side; else layer3."""
COLORMAP = "turbo"
OVERLAY_ALPHA = 0.5
"""Share of the heat colour in an overlay; the rest is the face itself."""


class ExplainError(FerError):
    """A heat map cannot be made for this model (no PyTorch weights, no such layer, ...)."""


@dataclass(frozen=True)
class Explanation:
    """One face's Grad-CAM map for one class.

    `heatmap` is float32 (side, side) in [0, 1] in the stored crop's pixels (48x48 by default):
    1 where the evidence for `class_name` is strongest, 0 where there is none (Grad-CAM's ReLU
    drops evidence against the class). All zeros when nothing in the face raised the score.
    `probability` is the model's softmax for that class on this single view of the face (no
    test-time augmentation, float32), so it may differ slightly from the reading shown.
    """

    class_index: int
    class_name: str
    probability: float
    layer: str
    heatmap: np.ndarray = field(repr=False)


class GradCam:
    """Grad-CAM for one trained model: its own copy of the network, the layer it reads, and the
    preprocessing prediction uses. Thread-safe (one map at a time per instance); the model the
    copy was taken from is never touched, so predictions may run beside it."""

    def __init__(self, model: nn.Module, class_names: Sequence[str], img_size: int, *,
                 layer: str | None = None, image_format: ImageFormat = DEFAULT_FORMAT) -> None:
        # a copy: Captum hooks the layer while it works, which must not catch another thread's
        # prediction on the shared model, and gradients must not reach the shared weights
        self.model = copy.deepcopy(model).float().eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # Grad-CAM needs the layer's gradient, not the weights'
        self.class_names = list(class_names)
        self.img_size = int(img_size)
        self.image_format = image_format  # faces are stored as the run stored them, as in prediction
        self.layer = layer or layer_for(self.model, self.img_size, image_format.channels)
        self.blocks = target_layers(self.model, self.layer)
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, layer: str | None = None) -> GradCam:
        """Grad-CAM for a training checkpoint (.pt), e.g. a run's checkpoints/best.pt."""
        from .models import load_checkpoint, model_from_checkpoint
        from .predict import describe_checkpoint
        ckpt = load_checkpoint(path)
        info = describe_checkpoint(ckpt)
        return cls(model_from_checkpoint(ckpt, Path(path).name), info["classes"], info["img_size"],
                   layer=layer, image_format=ImageFormat.of(ckpt["config"]))

    @classmethod
    def for_predictor(cls, predictor: Predictor, *, layer: str | None = None) -> GradCam:
        """Grad-CAM for what `predictor` runs: its PyTorch model, or, for an ONNX Runtime
        predictor opened from a .pt checkpoint, that checkpoint's model. A bare .onnx file holds
        no gradients to follow: ExplainError says that the PyTorch checkpoint is needed."""
        model = predictor.model
        if model is None:
            model = _model_behind(predictor)
        return cls(model, predictor.class_names, predictor.img_size, layer=layer,
                   image_format=predictor.image_format)

    def heatmaps(self, faces: torch.Tensor, targets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 stored faces (N, H, W) grey or (N, H, W, 3) RGB and a class index per face ->
        (maps, probabilities): maps float32 (N, H, W) in [0, 1] (`Explanation.heatmap`),
        probabilities float32 (N,) of each target class."""
        from captum.attr import LayerAttribution, LayerGradCam

        if faces.dtype != torch.uint8 or not (faces.ndim == 3 or (faces.ndim == 4 and faces.shape[-1] == 3)):
            raise ValueError(f"faces must be uint8 (N, H, W) or (N, H, W, 3), got {faces.dtype} {tuple(faces.shape)}")
        if len(targets) != len(faces):
            raise ValueError(f"{len(faces)} faces but {len(targets)} target classes")
        if len(faces) == 0:
            return (np.zeros((0, *faces.shape[1:3]), np.float32), np.zeros(0, np.float32))
        for target in targets:
            if not 0 <= int(target) < len(self.class_names):
                raise ValueError(f"class index {target} is not one of the model's "
                                 f"{len(self.class_names)} classes")
        batch = eval_transform(faces, self.img_size)
        outputs: list[torch.Tensor] = []  # the logits of Captum's own forward: no second pass
        with self._lock, torch.enable_grad():  # Grad-CAM needs gradients: never inference_mode
            hook = self.model.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
            try:  # an ensemble has one such block per member: their maps add up
                raw = sum(LayerGradCam(self.model, block).attribute(
                    batch, target=[int(t) for t in targets], relu_attributions=True)
                    for block in self.blocks)
            finally:
                hook.remove()
        # the map goes to the stored crop's own frame: img_size only rescales that crop
        maps = LayerAttribution.interpolate(raw.detach().float(), tuple(faces.shape[1:3]),
                                            interpolate_mode="bilinear")[:, 0]
        probs = outputs[-1].float().softmax(1)
        peak = maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
        maps = (maps / peak).clamp_(0, 1)  # ReLU'd already: >= 0
        chosen = probs[torch.arange(len(targets)), torch.as_tensor([int(t) for t in targets])]
        return maps.numpy().astype(np.float32), chosen.numpy().astype(np.float32)

    def explain(self, faces: Sequence[Image.Image | np.ndarray],
                classes: Sequence[str | int | None] | None = None) -> list[Explanation]:
        """Maps for face crops (any PIL image or uint8 array; each goes through `to_stored`, as
        in prediction). `classes[i]` names the class to explain for face i (a name or an index);
        None (or no `classes`) explains the class the model scores highest on that face."""
        wanted = list(classes) if classes is not None else [None] * len(faces)
        if len(wanted) != len(faces):
            raise ValueError(f"{len(faces)} faces but {len(wanted)} classes")
        stored = torch.from_numpy(np.stack([_stored(face, self.image_format) for face in faces])) if faces \
            else self.image_format.empty_batch()
        targets = [self.class_index(c) for c in wanted]
        if any(t is None for t in targets):
            with torch.no_grad(), self._lock:
                top = self.model(eval_transform(stored, self.img_size)).argmax(1).tolist()
            targets = [top[i] if t is None else t for i, t in enumerate(targets)]
        maps, probs = self.heatmaps(stored, targets)
        return [Explanation(class_index=t, class_name=self.class_names[t], probability=float(p),
                            layer=self.layer, heatmap=m) for t, p, m in zip(targets, probs, maps, strict=True)]

    def class_index(self, wanted: str | int | None) -> int | None:
        """A class name or index -> its index (None stays None); ValueError names the classes."""
        if wanted is None:
            return None
        if isinstance(wanted, (int, np.integer)) and not isinstance(wanted, bool):
            if 0 <= int(wanted) < len(self.class_names):
                return int(wanted)
        elif wanted in self.class_names:
            return self.class_names.index(wanted)
        raise ValueError(f"{wanted!r} is not one of this model's classes: {', '.join(self.class_names)}")


def layer_for(model: nn.Module, img_size: int, channels: int = 1) -> str:
    """The layer Grad-CAM reads at this input size: layer4 when its map is at least
    MIN_MAP_SIDE a side, else layer3 (see the module docstring for why)."""
    sides = feature_map_sides(model, img_size, channels)
    return "layer4" if sides.get("layer4", 0) >= MIN_MAP_SIDE else "layer3"


def feature_map_sides(model: nn.Module, img_size: int, channels: int = 1) -> dict[str, int]:
    """The spatial side of each of LAYERS' outputs for an img_size input of `channels` channels
    (one dry forward).
    ExplainError when the model lacks one of them."""
    modules = {name: target_layers(model, name)[0] for name in LAYERS}
    sides: dict[str, int] = {}
    hooks = [module.register_forward_hook(
        lambda _m, _i, out, name=name: sides.__setitem__(name, int(out.shape[-1])))
        for name, module in modules.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            parameter = next(model.parameters(), None)
            model(torch.zeros(1, channels, img_size, img_size,
                              device=parameter.device if parameter is not None else None))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return sides


def target_layers(model: nn.Module, name: str) -> list[nn.Module]:
    """The block `name` of a ResNet, or of each member of an ensemble (`members`, as
    fer_core.ensemble builds it); ExplainError (in words) for a model without it."""
    if name not in LAYERS:
        raise ExplainError(f"Grad-CAM reads one of {', '.join(LAYERS)}, not {name!r}")
    members = getattr(model, "members", None)
    networks = list(members) if isinstance(members, nn.ModuleList) and len(members) else [model]
    blocks = [getattr(network, name, None) for network in networks]
    if not all(isinstance(block, nn.Module) for block in blocks):
        raise ExplainError(f"this model has no {name} block ({type(model).__name__}): Grad-CAM here "
                           "needs the ResNet18 that fer_core trains")
    return blocks


def _model_behind(predictor: Predictor) -> nn.Module:
    """The PyTorch model of an ONNX Runtime predictor that was opened from a .pt checkpoint."""
    path = predictor.info.get("path")
    if not path or Path(path).suffix.lower() == ".onnx":
        raise ExplainError("Grad-CAM needs the PyTorch checkpoint (.pt): this model is an ONNX "
                           "file, which keeps no gradients to follow")
    from .models import load_checkpoint, model_from_checkpoint
    return model_from_checkpoint(load_checkpoint(path), Path(path).name)


def _stored(face: Image.Image | np.ndarray, image_format: ImageFormat) -> np.ndarray:
    if isinstance(face, np.ndarray):
        face = Image.fromarray(face if face.dtype == np.uint8 else np.clip(face, 0, 255).astype(np.uint8))
    return to_stored(face, image_format)


# ---- pictures -----------------------------------------------------------------------------

def heat_colours(heatmap: np.ndarray) -> np.ndarray:
    """A map in [0, 1] (H, W) -> uint8 RGB (H, W, 3) in the COLORMAP (blue low, red high)."""
    return (_colour_table()[np.clip(np.rint(np.asarray(heatmap, np.float32) * 255), 0, 255)
                            .astype(np.uint8)])


_TABLE: list[np.ndarray] = []


def _colour_table() -> np.ndarray:
    if not _TABLE:
        from matplotlib import colormaps  # only when a map is painted
        _TABLE.append((colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8))
    return _TABLE[0]


def overlay(image: Image.Image | np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA
            ) -> Image.Image:
    """The heat map blended over `image`, as an RGB image of the same size (the map is resized
    to it bilinearly). Enlarge a 48 px crop first (nearest neighbour) for a sharper face."""
    base = (Image.fromarray(image) if isinstance(image, np.ndarray) else image).convert("RGB")
    colours = Image.fromarray(heat_colours(_resized(heatmap, base.size)))
    return Image.blend(base, colours, float(np.clip(alpha, 0.0, 1.0)))


def overlay_on_box(photo: Image.Image, box: FaceBox, heatmap: np.ndarray, *, scale: float = 1.0,
                   alpha: float = OVERLAY_ALPHA, outline: str | None = "white") -> Image.Image:
    """The whole photo with the face's heat map blended over the square the model's crop came
    from (the box's centre, its longer side; turned back for a tilted face). `box` is in the
    photo's original pixels, `scale` maps them to `photo` (a thumbnail's width / original width).
    """
    from PIL import ImageDraw

    result = photo.convert("RGB")
    cx, cy = (box.x + box.w / 2) * scale, (box.y + box.h / 2) * scale
    side = max(1, round(max(box.w, box.h) * scale))
    colours = Image.fromarray(heat_colours(_resized(heatmap, (side, side)))).convert("RGBA")
    colours.putalpha(round(255 * float(np.clip(alpha, 0.0, 1.0))))
    if box.angle:  # the crop was turned upright by `angle`: turn its map back
        colours = colours.rotate(-box.angle, resample=Image.Resampling.BILINEAR, expand=True)
    left, top = round(cx - colours.width / 2), round(cy - colours.height / 2)
    result.paste(colours, (left, top), colours)
    if outline:
        corners = _square_corners(cx, cy, side, box.angle)
        ImageDraw.Draw(result).polygon(corners, outline=outline, width=max(1, round(side / 80)))
    return result


def _square_corners(cx: float, cy: float, side: float, angle: float) -> list[tuple[float, float]]:
    half, turn = side / 2, math.radians(angle)  # PIL rotates counter-clockwise on a y-down image
    cos, sin = math.cos(turn), math.sin(turn)
    return [(cx + dx * cos + dy * sin, cy - dx * sin + dy * cos)
            for dx, dy in ((-half, -half), (half, -half), (half, half), (-half, half))]


def _resized(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    values = np.asarray(heatmap, np.float32)
    if values.shape[::-1] == tuple(size):
        return values
    return np.asarray(Image.fromarray(values, "F").resize(size, Image.Resampling.BILINEAR), np.float32)


def mass_share(heatmap: np.ndarray, region: np.ndarray) -> float:
    """The share of a map's total mass inside `region` (a boolean mask of the map's shape);
    0 for an all-zero map."""
    values = np.asarray(heatmap, np.float64)
    total = float(values.sum())
    return float(values[np.asarray(region, bool)].sum() / total) if total > 0 else 0.0

