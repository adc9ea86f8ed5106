"""Disk for the whole VTAB-1k suite at ViT-B/16: every shipped cache spec, the test splits
cached or live, from the real split sizes and the same planning code `extract` uses; and the
bytes per image of each spec for backbones of every family (their shapes from a randomly
initialised copy: one forward of a blank image each).

    python benchmarks/storage.py            # writes results/storage.json (no data)

Per task, a VTAB-1k cache stores train800val200 (1000 images) with train800 and val200 as its
rows; its test split is either cached too (`--splits train800,val200,train800val200,test`) or
live (the default)."""

from __future__ import annotations

import argparse
from pathlib import Path

from common import write_result
from sidetune.cache.layout import StageShape, TokenLayout
from sidetune.cache.plan import SplitPlan, split_nbytes
from sidetune.cache.spec import available_specs, load_spec
from sidetune.datasets.catalogue import VTAB_TASKS

# VTAB-1k test split sizes (the tfds test splits the protocol reports on).
TEST_IMAGES = {
    "cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
    "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
    "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}
VIT_B16 = TokenLayout(tuple(StageShape(stage, 197, 768, (14, 14), 1) for stage in range(13)))
BACKBONES = ("vit_base_patch16_224", "swin_tiny_patch4_window7_224", "convnext_tiny", "resnet50", "tf_efficientnet_lite0")
PER_IMAGE_SPECS = ("default", "final", "mean", "cnn-grid7", "cnn-last2")


def task_bytes(spec_name: str, test_images: int, test_cached: bool) -> int:
    spec = load_spec(spec_name)
    shape = spec.stored_layout(VIT_B16.shapes).image_shape()
    splits = [SplitPlan("train800val200", "stored", 1000), SplitPlan("train800", "view", 800),
              SplitPlan("val200", "view", 200), SplitPlan("test", "stored" if test_cached else "live", test_images)]
    return sum(split_nbytes(split, shape, spec.codec()) for split in splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    assert set(TEST_IMAGES) == set(VTAB_TASKS)
    rows = []
    for spec in available_specs():
        live = {task: task_bytes(spec, images, False) for task, images in TEST_IMAGES.items()}
        cached = {task: task_bytes(spec, images, True) for task, images in TEST_IMAGES.items()}
        rows.append({"spec": spec, "per_task_live": live, "per_task_cached": cached,
                     "suite_live": sum(live.values()), "suite_cached": sum(cached.values())})
    write_result("storage", {"backbone": "vit_b16 (12 blocks, 197 tokens, width 768)", "test_images": TEST_IMAGES,
                             "rows": rows, "per_image": per_image_bytes()}, args.out)


def per_image_bytes() -> list[dict]:
    from sidetune.backbones import load_backbone

    rows = []
    for name in BACKBONES:
        backbone = TokenLayout(load_backbone(name, pretrained=False).stages)
        row = {"backbone": name, "stages": len(backbone.shapes), "bytes": {}}
        for spec_name in PER_IMAGE_SPECS:
            spec = load_spec(spec_name)
            row["bytes"][spec_name] = spec.codec().image_nbytes(spec.stored_layout(backbone.shapes).image_shape())
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
