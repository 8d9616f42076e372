"""`moco-fast export`: the query backbone for torchvision or detectron2, or the query encoder as an
official MoCo checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from moco_fast.commands import (
    ARCH_HELP,
    CHECKPOINT_HELP,
    HelpFormatter,
    check_device_name,
    check_output,
    refuse_dead_link,
    require,
    resolve_checkpoint,
)

log = logging.getLogger("moco_fast")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the query backbone as a torchvision state dict or a detectron2 checkpoint, or the query "
        "encoder as an official MoCo checkpoint",
        description="torchvision: a ResNet state dict that torchvision.models.<arch>() loads with strict=False "
        "(only fc.* missing; strict=True once net.fc = nn.Identity()); a CIFAR-stem backbone exports too, but "
        "rebuild its stem (3x3 conv1, no max-pool) before loading. detectron2: the official MoCo conversion "
        "(stem., res2..res5, shortcut, convK.norm; a pickle with matching_heuristics), for the paper's detection "
        "transfer; for any ResNet but R-50 it prints the MODEL.RESNETS config lines that build it (ResNet-18/34 "
        "need an FPN config: a C4 config's ROI head builds res5 of bottleneck blocks); CIFAR stems are refused. "
        "An official MoCo checkpoint converts as the official script does (its head left out). moco: the official "
        "main_moco.py checkpoint's layout ({'arch', 'state_dict'}: module.encoder_q.<torchvision name>, the head as "
        "fc), which the official main_lincls.py --pretrained and detection/convert-pretrain-to-detectron2.py read, "
        "as moco-fast's own commands do; CIFAR stems are refused.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help=f"{CHECKPOINT_HELP}; or give it as --checkpoint")
    p.add_argument(
        "--checkpoint",
        dest="checkpoint_flag",
        metavar="CHECKPOINT",
        help="the checkpoint as knn, lincls and finetune take it (default: the CHECKPOINT argument)",
    )
    p.add_argument("--arch", help=ARCH_HELP)
    p.add_argument(
        "--format",
        required=True,
        choices=["torchvision", "detectron2", "moco"],
        help="torchvision: a ResNet state dict (torch.save); detectron2: the official MoCo conversion (a pickle); "
        "moco: an official MoCo checkpoint (torch.save)",
    )
    p.add_argument(
        "--output",
        "--out",
        required=True,
        help="file to write (.pth for torchvision; detectron2: a .pkl, which it needs; moco: any name, "
        "main_moco.py's are .pth.tar); --out as lincls and finetune name it",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite --output if it exists (never a run's own file: checkpoint.pt, config.json...); a symbolic "
        "link there is replaced by the file, its target left as it is, as convert's DST",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="accepted for symmetry with other commands; export runs on the CPU (any other device is named in "
        "a warning: it has no effect)",
    )
    p.set_defaults(func=run)


def given_checkpoint(args: argparse.Namespace) -> tuple[str, str]:
    """The checkpoint, given as the argument or as --checkpoint (the other commands' flag, which their
    users type here too), and the flag that names it in an error ("" for the argument)."""
    given = [(path, flag) for path, flag in ((args.checkpoint, ""), (args.checkpoint_flag, "--checkpoint")) if path]
    require(len(given) < 2, "the checkpoint is given twice (CHECKPOINT and --checkpoint): give it once")
    require(
        len(given) == 1,
        "give the checkpoint to export: moco-fast export CHECKPOINT --format F --output FILE, or --checkpoint "
        "CHECKPOINT",
    )
    return given[0]


def run(args: argparse.Namespace) -> int:
    from moco_fast.backbone import check_arch
    from moco_fast.export import export
    from moco_fast.run_folder import run_file

    check_device_name(args.device)
    if args.device != "cpu":  # `--device cuda` exported on the CPU without a word, as if it took effect
        log.warning("--device %s has no effect: export copies tensors and runs on the CPU", args.device)
    check_arch(args.arch)
    # detectron2's DetectionCheckpointer picks its reader by the name: only a .pkl is unpickled (with
    # matching_heuristics); any other name goes to torch.load, which cannot read this plain pickle.
    # Its test is case-sensitive (filename.endswith(".pkl")): r50.PKL goes to torch.load too
    require(
        args.format != "detectron2" or args.output.endswith(".pkl"),
        f"--output {args.output}: detectron2 reads this format only from a .pkl file: name it .pkl",
    )
    checkpoint = resolve_checkpoint(*given_checkpoint(args))
    # an existing folder, the checkpoint itself, or a run's own file is refused even with --force
    # a loop of links, or a folder above --output that is a link to nothing: one line (mkdir said
    # "[Errno 17] File exists", and one link of a loop was replaced without --force), as convert's DST
    refuse_dead_link(Path(args.output), "--output", missing_target=False)
    output = check_output(args.output, "--output", inputs=(checkpoint,), replaces=run_file)
    # A link at --output is replaced by the file (with --force), its target left as it is, as
    # convert's DST: written through, a link to a run's checkpoint.pt or config.json would pass
    # run_file, which judges the name given, and each write would land beside the target
    link = os.readlink(output) if output.is_symlink() else None
    res = export(checkpoint, args.format, output, force=args.force, arch=args.arch)
    print(f"wrote {res['output']}: {res['keys']} tensors of the {res['arch']} {res['part']} ({res['format']})")
    if link is not None:
        print(f"note: {output} was a symbolic link to {link}: the file replaced the link, and {link} is unchanged")
    for line in loading_notes(res["format"], res["arch"], res["stem"]):
        print(f"note: {line}")
    return 0


def loading_notes(fmt: str, arch: str, stem: str, num_classes: int | None = None) -> list[str]:
    """What loading the export needs beyond torchvision's, detectron2's or the official MoCo scripts'
    defaults. `num_classes`: the file holds a classifier of that many classes (finetune's network),
    loaded strictly."""
    from moco_fast.backbone import WIDER

    k = WIDER.get(arch, 1)
    notes = []
    if fmt == "torchvision" and k > 1:
        build = f"resnet({arch!r})" if num_classes is None else f"resnet({arch!r}, num_classes={num_classes})"
        notes.append(
            f"{arch} is not in torchvision: moco_fast.backbone.{build} builds it (torchvision's ResNet "
            f"class, every width times {k}); load this file into it"
            + (" with strict=False" if num_classes is None else "")
        )
    if fmt == "torchvision" and k == 1 and num_classes is not None:  # torchvision's default fc has 1000
        # torchvision's ImageNet stem does not take a CIFAR stem's 3x3 conv1 (a size mismatch)
        rebuilt = " once its stem is the CIFAR one (next note)" if stem == "cifar" else ""
        notes.append(f"torchvision.models.{arch}(num_classes={num_classes}) loads it strictly{rebuilt}")
    if fmt == "moco" and k > 1:
        notes.append(
            f"{arch} is not in torchvision: the official main_lincls.py cannot build it (its --arch names "
            "torchvision's models); moco-fast's knn, lincls and finetune read this file"
        )
    if fmt == "torchvision" and stem == "cifar":
        notes.append(
            f"CIFAR stem. Before load_state_dict, set net.conv1 = nn.Conv2d(3, {64 * k}, 3, 1, 1, bias=False) "
            "and net.maxpool = nn.Identity()"
        )
    if fmt == "detectron2":
        d2 = detectron2_resnet(arch)
        differ = {key: v for key, v in d2.items() if v != D2_R50[key]}
        if differ:  # its default R-50 would skip each weight of another shape with a warning, no error
            lines = [f"MODEL.RESNETS.{key} {v}" for key, v in differ.items()]
            notes.append(
                f"{arch} is not detectron2's default R-50: set {', '.join(lines[:-1])}"
                + (" and " if len(lines) > 1 else "")
                + f"{lines[-1]} in its config (an R-50 config loads only the weights whose shapes fit, "
                "with a warning for each other one)"
            )
        if d2["DEPTH"] in (18, 34):  # basic blocks: detectron2 builds them in its backbone only
            notes.append(
                "a C4 config (the official MoCo ones) builds res5 in its ROI head (Res5ROIHeads) of bottleneck "
                f"blocks whatever MODEL.RESNETS.DEPTH says, which {arch}'s basic blocks do not fit: res5 would "
                "train mostly from scratch there; use an FPN config, whose backbone builds all of res2..res5, "
                "with the input lines of the MoCo configs (detectron2's own feed BGR, caffe's mean and a std of 1): "
                + ", ".join(f"{key} {v}" for key, v in D2_TORCHVISION_INPUT.items())
            )
    return notes


# detectron2's MODEL.RESNETS defaults (detectron2/config/defaults.py): the ResNet-50 that its R-50
# configs, the official MoCo detection configs among them, build
D2_R50 = {"DEPTH": 50, "STEM_OUT_CHANNELS": 64, "RES2_OUT_CHANNELS": 256, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64}


# The input the weights were trained on (RGB, torchvision's mean and std, on 0..255 pixels), as the
# official MoCo detection configs set it; detectron2's defaults, which its own configs keep, are MSRA's
D2_TORCHVISION_INPUT = {
    "MODEL.PIXEL_MEAN": "[123.675, 116.280, 103.530]",
    "MODEL.PIXEL_STD": "[58.395, 57.120, 57.375]",
    "INPUT.FORMAT": "RGB",
}


def detectron2_resnet(arch: str) -> dict[str, int]:
    """The MODEL.RESNETS values with which detectron2 builds the network of `arch`, read off the
    network itself (on the meta device: no memory, no initialisation). Basic blocks (ResNet-18/34)
    have no groups: detectron2 wants NUM_GROUPS 1 there, its default."""
    import torch
    from torchvision.models.resnet import Bottleneck

    from moco_fast.backbone import resnet

    with torch.device("meta"):
        net = resnet(arch)
    stages = (net.layer1, net.layer2, net.layer3, net.layer4)
    bottleneck = isinstance(net.layer1[0], Bottleneck)
    last = net.layer1[0].conv3 if bottleneck else net.layer1[0].conv2
    out = {
        "DEPTH": sum(len(s) for s in stages) * (3 if bottleneck else 2) + 2,  # the convolutions, fc included
        "STEM_OUT_CHANNELS": net.conv1.out_channels,
        "RES2_OUT_CHANNELS": last.out_channels,
    }
    if bottleneck:
        inner = net.layer1[0].conv2  # the 3x3: groups x width per group channels
        out.update(NUM_GROUPS=inner.groups, WIDTH_PER_GROUP=inner.out_channels // inner.groups)
    return out
