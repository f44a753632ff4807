"""open_clip visual tower <-> transformers ``CLIPVisionModelWithProjection``.

open_clip checkpoints have no ``config.json``, so ``mergekit-yaml`` cannot read them. The visual
tower of an open_clip ViT is the same network as a transformers CLIP vision model with its
projection; only names and a few layouts differ:

* open_clip fuses the attention input projection (``attn.in_proj_weight``, rows q, k, v);
  transformers keeps ``q_proj``, ``k_proj``, ``v_proj``;
* open_clip's ``proj`` is ``[width, embed_dim]`` and applied as ``x @ proj``; transformers'
  ``visual_projection`` is a bias-free ``Linear`` whose weight is its transpose;
* the activation is a model-config choice (``quick_gelu``), a ``hidden_act`` in transformers.

The projection is kept, so ``image_embeds`` of the converted model equal open_clip's
``encode_image``. Variants the transformers model cannot express are refused by name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dam_mergekit.convert._io import atomic_output, load_tensor_file, read_model_dir
from dam_mergekit.errors import DamError

LOG = logging.getLogger(__name__)

HF_PREFIX = "vision_model."
HF_PROJECTION = "visual_projection.weight"
OPENCLIP_PREFIX = "visual."
DEFAULT_EPS = 1e-5

# vision_cfg keys open_clip knows; the unsupported ones among them are refused one by one below
_CUSTOM_BLOCK_FLAGS = (
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
)
_KNOWN_VISION_KEYS = {
    "layers",
    "width",
    "head_width",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "patch_dropout",
    "output_tokens",
    "final_ln_after_pool",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "pos_embed_type",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
    "act_kwargs",
    "norm_kwargs",
    "timm_model_name",
    "attentional_pool",
    "no_ln_pre",
    "pool_type",
    "ls_init_value",
    "block_type",
    *_CUSTOM_BLOCK_FLAGS,
}
_ACTIVATIONS = {  # (quick_gelu, GELU approximate) -> transformers hidden_act
    (True, "none"): "quick_gelu",
    (False, "none"): "gelu",
    (False, "tanh"): "gelu_pytorch_tanh",
}


@dataclass(frozen=True)
class VisionSpec:
    """The numbers a CLIP ViT visual tower is built from, in both libraries' terms."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    image_size: int
    patch_size: int
    embed_dim: int
    hidden_act: str
    layer_norm_eps: float = DEFAULT_EPS

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


# ----------------------------------------------------------------------------------------------
# configs


def _read_json(path: Path, missing: str) -> dict:
    """A JSON file's content, or a one-line DamError (``missing`` when there is no file)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamError(missing) from None
    except json.JSONDecodeError as err:
        raise DamError(f"{path}: not valid JSON ({err})") from None


def load_openclip_config(model: str | None = None, model_config: str | Path | None = None) -> dict:
    """An open_clip model config: a built-in one by name (no download) or a JSON file."""
    if (model is None) == (model_config is None):
        raise DamError("give exactly one of --model NAME or --model-config FILE.json")
    if model_config is not None:
        path = Path(model_config)
        cfg = _read_json(path, f"{path}: model config not found")
        cfg = cfg.get("model_cfg", cfg)  # open_clip_config.json wraps it
        where = str(path)
    else:
        try:
            import open_clip
        except ImportError:
            raise DamError(
                "--model needs open_clip (pip install 'dam-mergekit[openclip]'); or pass "
                "--model-config with open_clip's JSON model config"
            ) from None
        if model not in open_clip.list_models():
            raise DamError(
                f"--model {model}: not one of open_clip's built-in configs (see "
                "open_clip.list_models()); hub configs are not fetched: pass --model-config"
            )
        cfg, where = open_clip.get_model_config(model), f"open_clip config {model}"
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "embed_dim" not in cfg:
        raise DamError(f"{where}: not an open_clip model config (needs embed_dim and vision_cfg)")
    return cfg


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise DamError(f"unsupported open_clip variant: non-square {what} {tuple(value)}")
        value = value[0]
    return int(value)


def spec_from_openclip_config(
    cfg: Mapping[str, Any], *, quick_gelu: bool | None = None
) -> VisionSpec:
    """The tower an open_clip model config describes; refuses what transformers cannot express."""
    vision = dict(cfg["vision_cfg"])

    def refuse(what: str) -> None:
        raise DamError(
            f"unsupported open_clip variant: {what}; only plain ViT visual towers with "
            "class-token pooling convert to transformers CLIPVisionModelWithProjection"
        )

    unknown = sorted(set(vision) - _KNOWN_VISION_KEYS)
    if unknown:
        refuse(f"unknown vision_cfg keys {unknown}")
    if vision.get("timm_model_name"):
        refuse(f"timm visual tower (vision_cfg.timm_model_name={vision['timm_model_name']!r})")
    layers = vision.get("layers", 12)
    if isinstance(layers, (list, tuple)):
        refuse(f"ModifiedResNet visual tower (vision_cfg.layers={list(layers)})")
    if vision.get("attentional_pool"):
        refuse(f"attentional pooling (vision_cfg.attentional_pool={vision['attentional_pool']!r})")
    if vision.get("pool_type", "tok") != "tok":
        refuse(f"vision_cfg.pool_type={vision['pool_type']!r} (only 'tok')")
    if vision.get("no_ln_pre"):
        refuse("no pre-transformer LayerNorm (vision_cfg.no_ln_pre=true)")
    if vision.get("ls_init_value") is not None:
        refuse(f"LayerScale (vision_cfg.ls_init_value={vision['ls_init_value']})")
    custom = [k for k in _CUSTOM_BLOCK_FLAGS if vision.get(k)]
    if vision.get("block_type") not in (None, "default") or custom:
        what = custom or f"vision_cfg.block_type={vision['block_type']}"
        refuse(f"custom attention blocks ({what})")
    if vision.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        refuse(f"vision_cfg.pos_embed_type={vision['pos_embed_type']!r}")
    norm_kwargs = dict(vision.get("norm_kwargs") or {})
    eps = float(norm_kwargs.pop("eps", DEFAULT_EPS))
    if norm_kwargs:
        refuse(f"LayerNorm options {sorted(norm_kwargs)} (vision_cfg.norm_kwargs; only eps)")
    act_kwargs = dict(vision.get("act_kwargs") or {})
    approximate = act_kwargs.pop("approximate", "none")
    use_quick = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    if act_kwargs or (use_quick, approximate) not in _ACTIVATIONS:
        refuse(f"activation quick_gelu={use_quick} with act_kwargs {vision.get('act_kwargs')}")
    width = int(vision.get("width", 768))
    head_width = int(vision.get("head_width", 64))
    if width % head_width:
        refuse(f"width {width} not a multiple of head_width {head_width}")
    image_size = _square(vision.get("image_size", 224), "image_size")
    patch_size = _square(vision.get("patch_size", 16), "patch_size")
    if image_size % patch_size:
        refuse(f"image_size {image_size} not a multiple of patch_size {patch_size}")
    return VisionSpec(
        width=width,
        layers=int(layers),
        heads=width // head_width,
        mlp_width=int(width * float(vision.get("mlp_ratio", 4.0))),
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=int(cfg["embed_dim"]),
        hidden_act=_ACTIVATIONS[(use_quick, approximate)],
        layer_norm_eps=eps,
    )


def hf_config(spec: VisionSpec, dtype: torch.dtype | None = None):
    """The transformers ``CLIPVisionConfig`` of a ``CLIPVisionModelWithProjection`` for ``spec``."""
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(
        hidden_size=spec.width,
        intermediate_size=spec.mlp_width,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_channels=3,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act=spec.hidden_act,
        layer_norm_eps=spec.layer_norm_eps,
        projection_dim=spec.embed_dim,
        architectures=["CLIPVisionModelWithProjection"],
    )
    if dtype is not None:
        config.dtype = dtype
    return config


def spec_from_hf_config(config: Mapping[str, Any], where: str = "config.json") -> VisionSpec:
    """The tower of a transformers CLIP vision (or full CLIP) ``config.json``."""
    projection_dim = config.get("projection_dim")
    if config.get("model_type") == "clip":
        config = config.get("vision_config") or {}
    if config.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise DamError(f"{where}: model_type {config.get('model_type')!r}, not a CLIP vision model")
    act = config.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS.values():
        raise DamError(f"{where}: hidden_act {act!r} has no open_clip counterpart")
    hidden = int(config.get("hidden_size", 768))
    return VisionSpec(
        width=hidden,
        layers=int(config.get("num_hidden_layers", 12)),
        heads=int(config.get("num_attention_heads", 12)),
        mlp_width=int(config.get("intermediate_size", 3072)),
        image_size=int(config.get("image_size", 224)),
        patch_size=int(config.get("patch_size", 32)),
        embed_dim=int(config.get("projection_dim", projection_dim or 512)),
        hidden_act=act,
        layer_norm_eps=float(config.get("layer_norm_eps", DEFAULT_EPS)),
    )


def openclip_config_from_spec(spec: VisionSpec) -> dict[str, Any]:
    """The ``embed_dim``/``quick_gelu``/``vision_cfg`` part of an open_clip model config."""
    vision: dict[str, Any] = {
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "width": spec.width,
        "layers": spec.layers,
        "head_width": spec.width // spec.heads,
        "mlp_ratio": spec.mlp_width / spec.width,
    }
    if spec.layer_norm_eps != DEFAULT_EPS:
        vision["norm_kwargs"] = {"eps": spec.layer_norm_eps}
    if spec.hidden_act == "gelu_pytorch_tanh":
        vision["act_kwargs"] = {"approximate": "tanh"}
    return {
        "embed_dim": spec.embed_dim,
        "quick_gelu": spec.hidden_act == "quick_gelu",
        "vision_cfg": vision,
    }


# ----------------------------------------------------------------------------------------------
# state dicts


def _renames(spec: VisionSpec) -> list[tuple[str, str]]:
    """(open_clip visual name, transformers name) for every tensor copied as is."""
    pairs = [
        ("conv1.weight", HF_PREFIX + "embeddings.patch_embedding.weight"),
        ("class_embedding", HF_PREFIX + "embeddings.class_embedding"),
        ("positional_embedding", HF_PREFIX + "embeddings.position_embedding.weight"),
    ]
    for suffix in ("weight", "bias"):
        pairs.append((f"ln_pre.{suffix}", f"{HF_PREFIX}pre_layrnorm.{suffix}"))
        pairs.append((f"ln_post.{suffix}", f"{HF_PREFIX}post_layernorm.{suffix}"))
    for i in range(spec.layers):
        oc, hf = f"transformer.resblocks.{i}.", f"{HF_PREFIX}encoder.layers.{i}."
        for suffix in ("weight", "bias"):
            pairs += [
                (f"{oc}ln_1.{suffix}", f"{hf}layer_norm1.{suffix}"),
                (f"{oc}ln_2.{suffix}", f"{hf}layer_norm2.{suffix}"),
                (f"{oc}attn.out_proj.{suffix}", f"{hf}self_attn.out_proj.{suffix}"),
                (f"{oc}mlp.c_fc.{suffix}", f"{hf}mlp.fc1.{suffix}"),
                (f"{oc}mlp.c_proj.{suffix}", f"{hf}mlp.fc2.{suffix}"),
            ]
    return pairs


def openclip_shapes(spec: VisionSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the open_clip visual tower and its shape (names without ``visual.``)."""
    w, m = spec.width, spec.mlp_width
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (w, 3, spec.patch_size, spec.patch_size),
        "class_embedding": (w,),
        "positional_embedding": (spec.num_positions, w),
        "ln_pre.weight": (w,),
        "ln_pre.bias": (w,),
        "ln_post.weight": (w,),
        "ln_post.bias": (w,),
        "proj": (w, spec.embed_dim),
    }
    for i in range(spec.layers):
        p = f"transformer.resblocks.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (w,),
                p + "ln_1.bias": (w,),
                p + "ln_2.weight": (w,),
                p + "ln_2.bias": (w,),
                p + "attn.in_proj_weight": (3 * w, w),
                p + "attn.in_proj_bias": (3 * w,),
                p + "attn.out_proj.weight": (w, w),
                p + "attn.out_proj.bias": (w,),
                p + "mlp.c_fc.weight": (m, w),
                p + "mlp.c_fc.bias": (m,),
                p + "mlp.c_proj.weight": (w, m),
                p + "mlp.c_proj.bias": (w,),
            }
        )
    return shapes


def _check_shapes(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
    prefix: str,
) -> None:
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise DamError(
            f"{where}: {len(missing)} tensor(s) of the configured tower missing, e.g. "
            f"{prefix}{missing[0]}; does the model config match the checkpoint?"
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise DamError(
            f"{where}: {len(extra)} tensor(s) the configured tower does not have, e.g. "
            f"{prefix}{extra[0]}; the checkpoint holds a variant this converter does not support, "
            "or the model config does not match it"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise DamError(
                f"{where}: {prefix}{name} has shape {tuple(tensors[name].shape)}, the model "
                f"config implies {shape}; does the model config match the checkpoint?"
            )


def _unwrap(obj: Any, where: str) -> Mapping[str, Any]:
    """The state dict inside common wrappers (``{"state_dict": ...}``, ``{"model": ...}``)."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), Mapping)),
            None,
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise DamError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    return obj


def visual_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The visual tower's tensors without their prefix (``visual.``, ``model.visual.``, none)."""
    state = _unwrap(obj, where)
    prefixes = {
        k[: -len("class_embedding")]
        for k in state
        if isinstance(k, str)
        and k.endswith("class_embedding")
        and f"{k[: -len('class_embedding')]}conv1.weight" in state
    }
    if not prefixes:
        if any(isinstance(k, str) and ".trunk." in f".{k}" for k in state):
            raise DamError(f"{where}: unsupported open_clip variant: timm visual tower (trunk.*)")
        if any(isinstance(k, str) and "attnpool." in k for k in state):
            raise DamError(f"{where}: unsupported open_clip variant: ModifiedResNet visual tower")
        raise DamError(
            f"{where}: no open_clip ViT visual tower found (no *class_embedding beside "
            "*conv1.weight); is this an open_clip CLIP checkpoint?"
        )
    if len(prefixes) > 1:
        raise DamError(f"{where}: several visual towers found (prefixes {sorted(prefixes)})")
    prefix = prefixes.pop()
    visual = {}
    for key, value in state.items():
        if isinstance(key, str) and key.startswith(prefix):
            if not isinstance(value, torch.Tensor):
                raise DamError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
            visual[key[len(prefix) :]] = value
    return visual


def openclip_to_hf(
    visual: Mapping[str, torch.Tensor], spec: VisionSpec, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """transformers ``CLIPVisionModelWithProjection`` tensors from open_clip visual ones."""
    _check_shapes(visual, openclip_shapes(spec), where, OPENCLIP_PREFIX)
    out = {hf: visual[oc] for oc, hf in _renames(spec)}
    for i in range(spec.layers):
        oc, hf = f"transformer.resblocks.{i}.attn.", f"{HF_PREFIX}encoder.layers.{i}.self_attn."
        for kind, fused in (
            ("weight", visual[oc + "in_proj_weight"]),
            ("bias", visual[oc + "in_proj_bias"]),
        ):
            for part, chunk in zip(("q", "k", "v"), fused.chunk(3, dim=0), strict=True):
                out[f"{hf}{part}_proj.{kind}"] = chunk
    out[HF_PROJECTION] = visual["proj"].t()
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_to_openclip(
    tensors: Mapping[str, torch.Tensor], spec: VisionSpec, where: str = "model"
) -> dict[str, torch.Tensor]:
    """An open_clip visual state dict (names without ``visual.``) from transformers tensors.

    Accepts ``CLIPVisionModelWithProjection``/``CLIPModel`` names (``vision_model.*``) and bare
    transformers-5 ``CLIPVisionModel`` names (``embeddings.*``) for the body.
    """
    names = dict(tensors)
    if HF_PROJECTION not in names:
        raise DamError(
            f"{where}: no {HF_PROJECTION}; a CLIPVisionModel without projection cannot become an "
            "open_clip visual tower (its image features are projected)"
        )
    if not any(k.startswith(HF_PREFIX) for k in names):
        names = {(k if k == HF_PROJECTION else HF_PREFIX + k): v for k, v in names.items()}
    names = {
        k: v
        for k, v in names.items()
        if k == HF_PROJECTION or (k.startswith(HF_PREFIX) and not k.endswith("position_ids"))
    }
    out = {oc: names.get(hf) for oc, hf in _renames(spec)}
    for i in range(spec.layers):
        hf = f"{HF_PREFIX}encoder.layers.{i}.self_attn."
        for kind, fused in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            parts = [names.get(f"{hf}{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"transformer.resblocks.{i}.attn.{fused}"] = (
                None if any(p is None for p in parts) else torch.cat(parts, dim=0)
            )
    out["proj"] = names[HF_PROJECTION].t()
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise DamError(
            f"{where}: {len(missing)} transformers tensor(s) missing for open_clip "
            f"{OPENCLIP_PREFIX}{missing[0]}; does config.json match the weights?"
        )
    used = (
        {hf for _, hf in _renames(spec)}
        | {HF_PROJECTION}
        | {
            f"{HF_PREFIX}encoder.layers.{i}.self_attn.{p}_proj.{kind}"
            for i in range(spec.layers)
            for p in "qkv"
            for kind in ("weight", "bias")
        }
    )
    extra = sorted(set(names) - used)
    if extra:
        raise DamError(
            f"{where}: {len(extra)} tensor(s) with no open_clip counterpart, e.g. "
            f"{extra[0]}; does config.json match the weights?"
        )
    result = {k: v.detach().contiguous().clone() for k, v in out.items()}
    _check_shapes(result, openclip_shapes(spec), where, OPENCLIP_PREFIX)
    return result


# ----------------------------------------------------------------------------------------------
# files


def convert_openclip_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    model_config: str | Path | None = None,
    quick_gelu: bool | None = None,
    allow_pickle: bool = False,
    force: bool = False,
) -> Path:
    """Write the visual tower of an open_clip checkpoint as a transformers model directory."""
    from safetensors.torch import save_file

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    cfg = load_openclip_config(model, model_config)
    spec = spec_from_openclip_config(cfg, quick_gelu=quick_gelu)
    visual = visual_state_dict(
        load_tensor_file(checkpoint, allow_pickle=allow_pickle), str(checkpoint)
    )
    tensors = openclip_to_hf(visual, spec, str(checkpoint))
    dtype = visual["conv1.weight"].dtype
    with atomic_output(out_dir, force=force) as tmp:
        hf_config(spec, dtype).save_pretrained(tmp)
        save_file(
            tensors,
            str(tmp / "model.safetensors"),
            metadata={"format": "pt", "converted_from": f"open_clip:{checkpoint.name}"},
        )
    LOG.info("wrote %s (%d tensors, %s)", out_dir, len(tensors), spec.hidden_act)
    return out_dir


def convert_hf_to_openclip(
    hf_dir: str | Path,
    out_file: str | Path,
    *,
    prefix: str = OPENCLIP_PREFIX,
    allow_pickle: bool = False,
    force: bool = False,
) -> Path:
    """Write a transformers CLIP vision directory as an open_clip visual state dict (.safetensors).

    The tensors are named ``{prefix}conv1.weight`` etc. (``visual.`` by default, as in a full
    open_clip CLIP state dict; load with ``strict=False`` beside a text tower, or pass
    ``prefix=""`` for a bare ``VisionTransformer``). The open_clip config of the tower is stored
    in the file's metadata under ``open_clip_model_cfg``.
    """
    from safetensors.torch import save_file

    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if out_file.suffix != ".safetensors":
        raise DamError(f"{out_file}: the output must be a .safetensors file")
    config_path = hf_dir / "config.json"
    config = _read_json(config_path, f"{config_path}: not found; is {hf_dir} a transformers model?")
    spec = spec_from_hf_config(config, str(config_path))
    visual = hf_to_openclip(read_model_dir(hf_dir, allow_pickle=allow_pickle), spec, str(hf_dir))
    metadata = {"format": "pt", "open_clip_model_cfg": json.dumps(openclip_config_from_spec(spec))}
    with atomic_output(out_file, force=force, is_dir=False) as tmp:
        save_file({prefix + k: v for k, v in visual.items()}, str(tmp), metadata=metadata)
    return out_file
