"""``dam-mergekit convert openclip | hf-to-openclip | hf4-vision``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="bring open_clip / transformers-4 CLIP checkpoints "
                                             "into the layout mergekit merges")
    csub = convert.add_subparsers(dest="convert_command", metavar="FORMAT")
    csub.required = True

    oc = csub.add_parser("openclip", help="open_clip CLIP checkpoint -> transformers "
                                          "CLIPVisionModelWithProjection directory")
    oc.add_argument("checkpoint", help="open_clip state dict (.safetensors; torch files need "
                                       "--allow-pickle)")
    oc.add_argument("out", help="output model directory")
    which = oc.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="an open_clip built-in model config name, e.g. ViT-B-32")
    which.add_argument("--model-config", help="open_clip model config JSON (embed_dim, "
                                              "vision_cfg, text_cfg)")
    gelu = oc.add_mutually_exclusive_group()
    gelu.add_argument("--quick-gelu", dest="quick_gelu", action="store_true", default=None,
                      help="force QuickGELU (OpenAI-pretrained weights loaded under a plain name)")
    gelu.add_argument("--no-quick-gelu", dest="quick_gelu", action="store_false",
                      help="force exact GELU whatever the config says")
    _common(oc)
    oc.set_defaults(func=cmd_openclip)

    back = csub.add_parser("hf-to-openclip", help="transformers CLIP vision directory (with "
                                                  "projection) -> open_clip visual state dict")
    back.add_argument("hf_dir", help="transformers model directory, e.g. a merged model")
    back.add_argument("out", help="output .safetensors file")
    back.add_argument("--prefix", default="visual.",
                      help="name prefix of the written tensors (default visual.; '' for a bare "
                           "VisionTransformer)")
    _common(back)
    back.set_defaults(func=cmd_hf_to_openclip)

    hf4 = csub.add_parser("hf4-vision", help="rename a transformers-4 CLIP vision directory's "
                                             "tensors (vision_model.*) for transformers 5")
    hf4.add_argument("in_dir", help="transformers-4 CLIPVisionModel(WithProjection) or CLIPModel "
                                    "directory")
    hf4.add_argument("out", help="output model directory")
    hf4.add_argument("--architecture", choices=("CLIPVisionModel", "CLIPVisionModelWithProjection"),
                     help="the model to write (default: config.json's; CLIPVisionModel for a "
                          "full CLIPModel, whose vision tower is extracted)")
    _common(hf4)
    hf4.set_defaults(func=cmd_hf4)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept torch pickle files (still read with weights_only=True)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def cmd_openclip(args: argparse.Namespace) -> int:
    from dam_mergekit.convert.openclip import convert_openclip_checkpoint

    out = convert_openclip_checkpoint(
        args.checkpoint, args.out, model=args.model, model_config=args.model_config,
        quick_gelu=args.quick_gelu, allow_pickle=args.allow_pickle, force=args.force,
    )
    print(f"wrote {out} (transformers CLIPVisionModelWithProjection)")
    return 0


def cmd_hf_to_openclip(args: argparse.Namespace) -> int:
    from dam_mergekit.convert.openclip import convert_hf_to_openclip

    out = convert_hf_to_openclip(args.hf_dir, args.out, prefix=args.prefix,
                                 allow_pickle=args.allow_pickle, force=args.force)
    print(f"wrote {out} (open_clip visual state dict)")
    return 0


def cmd_hf4(args: argparse.Namespace) -> int:
    from dam_mergekit.convert.hf4 import convert_hf4_vision

    out = convert_hf4_vision(args.in_dir, args.out, architecture=args.architecture,
                             allow_pickle=args.allow_pickle, force=args.force)
    print(f"wrote {out} (transformers-5 tensor names)")
    return 0
