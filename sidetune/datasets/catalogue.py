"""The benchmark catalogues: VTAB-1k's 19 tasks (their groups, class counts and, where one
exists, a Hugging Face hub copy used when no local VTAB-1k folder is present) and the five FGVC
tasks as VPT distributes them (KMnP/vpt: JSON split files, read by sidetune/datasets/json_splits.py)."""

from __future__ import annotations

from dataclasses import dataclass

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
GROUPS = ("natural", "specialized", "structured")


@dataclass(frozen=True)
class VtabTask:
    name: str
    group: str
    num_classes: int
    hub_id: str | None = None
    class_names: tuple[str, ...] | None = None

    def names(self) -> list[str]:
        return list(self.class_names) if self.class_names else [str(i) for i in range(self.num_classes)]


_DTD = (
    "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline "
    "dotted fibrous flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted "
    "lacelike lined marbled matted meshed paisley perforated pitted pleated polka-dotted porous "
    "potholed scaly smeared spiralled sprinkled stained stratified striped studded swirly veined "
    "waffled woven wrinkled zigzagged"
).split()
_EUROSAT = (
    "AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop "
    "Residential River SeaLake"
).split()

VTAB_TASKS: dict[str, VtabTask] = {
    task.name: task
    for task in [
        VtabTask("cifar", "natural", 100, "uoft-cs/cifar100"),
        VtabTask("caltech101", "natural", 102),
        VtabTask("dtd", "natural", 47, "tanganke/dtd", tuple(_DTD)),
        VtabTask("oxford_flowers102", "natural", 102, "nelorth/oxford-flowers"),
        VtabTask("oxford_iiit_pet", "natural", 37, "timm/oxford-iiit-pet"),
        VtabTask("svhn", "natural", 10, "ufldl-stanford/svhn", tuple(str(i) for i in range(10))),
        VtabTask("sun397", "natural", 397, "tanganke/sun397"),
        VtabTask("patch_camelyon", "specialized", 2, "1aurent/PatchCamelyon", ("no tumor", "tumor")),
        VtabTask("eurosat", "specialized", 10, "tanganke/eurosat", tuple(_EUROSAT)),
        VtabTask("resisc45", "specialized", 45, "timm/resisc45"),
        VtabTask("diabetic_retinopathy", "specialized", 5, None,
                 ("no DR", "mild", "moderate", "severe", "proliferative")),
        VtabTask("clevr_count", "structured", 8, None, tuple(str(i) for i in range(3, 11))),
        VtabTask("clevr_dist", "structured", 6),
        VtabTask("dmlab", "structured", 6),
        VtabTask("kitti", "structured", 4),
        VtabTask("dsprites_loc", "structured", 16),
        VtabTask("dsprites_ori", "structured", 16),
        VtabTask("smallnorb_azi", "structured", 18),
        VtabTask("smallnorb_ele", "structured", 9),
    ]
}

# Folder names used by common VTAB-1k distributions (NOAH, V-PETL Bench) for the same tasks.
FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "cifar": ("cifar100", "cifar-100"),
    "oxford_flowers102": ("flowers102",),
    "oxford_iiit_pet": ("pets", "oxford_pet"),
    "patch_camelyon": ("camelyon", "pcam"),
    "diabetic_retinopathy": ("retinopathy",),
    "dsprites_loc": ("dsprites_location",),
    "dsprites_ori": ("dsprites_orientation",),
    "smallnorb_azi": ("smallnorb_azimuth",),
    "smallnorb_ele": ("smallnorb_elevation",),
}

@dataclass(frozen=True)
class FgvcTask:
    """An FGVC task in VPT's layout: its folder under the data root (the first of `folders`
    found), holding train.json, val.json and test.json ({image path: class id}), and the folder
    its image paths are relative to (`image_dir`, "" for the dataset folder itself), as VPT's
    JSONDataset subclasses read them."""

    name: str
    num_classes: int
    folders: tuple[str, ...]
    image_dir: str


FGVC_GROUP = "fgvc"
FGVC_TASKS: dict[str, FgvcTask] = {
    task.name: task
    for task in [
        FgvcTask("cub", 200, ("CUB_200_2011", "cub", "CUB"), "images"),
        FgvcTask("nabirds", 555, ("nabirds", "NABirds"), "images"),
        FgvcTask("oxford_flowers", 102, ("OxfordFlower", "OxfordFlowers", "oxford_flowers", "flowers"), ""),
        FgvcTask("stanford_dogs", 120, ("Stanford-dogs", "StanfordDogs", "stanford_dogs", "dogs"), "Images"),
        FgvcTask("stanford_cars", 196, ("Stanford-cars", "StanfordCars", "stanford_cars", "cars"), ""),
    ]
}

# Published top-1 with the original ImageNet-21k ViT-B/16 (`vit_b16`): VTAB-1k as tabulated by
# V-PETL Bench's table, FGVC from the LAST paper: the numbers a sweep over the tasks is held against.
PUBLISHED_BACKBONE = "vit_base_patch16_224.orig_in21k"
PUBLISHED_TOP1: dict[str, dict[str, float]] = {
    "last": {
        "cifar": 66.7, "caltech101": 93.4, "dtd": 76.1, "oxford_flowers102": 99.6, "oxford_iiit_pet": 89.8,
        "svhn": 86.1, "sun397": 54.3, "patch_camelyon": 86.2, "eurosat": 96.3, "resisc45": 86.8,
        "diabetic_retinopathy": 75.4, "clevr_count": 81.9, "clevr_dist": 65.9, "dmlab": 49.4, "kitti": 82.6,
        "dsprites_loc": 87.9, "dsprites_ori": 46.7, "smallnorb_azi": 32.3, "smallnorb_ele": 51.5,
        "cub": 88.5, "nabirds": 84.4, "oxford_flowers": 99.7, "stanford_dogs": 86.0, "stanford_cars": 88.9,
    },
}
