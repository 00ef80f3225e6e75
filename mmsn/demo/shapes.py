"""A tiny deterministic dataset of coloured shapes for the demo and the tests.

Each image holds one to three shapes (square, circle, triangle) of random colour and size on a
noisy background. Written in the formats the upstream datasets read, so the demo configs use
mmdet's ``CocoDataset`` and mmseg's ``BaseSegDataset`` unchanged:

* ``images/{train,val}/NNNN.png``: RGB images;
* ``annotations/instances_{train,val}.json``: COCO instances (boxes, RLE masks, areas);
* ``seg_maps/{train,val}/NNNN.png``: semantic labels, 0 = background, 1-3 = the shapes.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Tuple

import numpy as np

CLASSES = ('square', 'circle', 'triangle')
SEG_CLASSES = ('background',) + CLASSES
PALETTE = [(0, 0, 0), (220, 20, 60), (0, 128, 255), (60, 179, 113)]


def _draw_shape(canvas: np.ndarray, kind: int, center: Tuple[int, int], size: int,
                color: Tuple[int, int, int]) -> None:
    import cv2
    cx, cy = center
    if kind == 0:
        cv2.rectangle(canvas, (cx - size, cy - size), (cx + size, cy + size), color, -1)
    elif kind == 1:
        cv2.circle(canvas, (cx, cy), size, color, -1)
    else:
        points = np.array([[cx, cy - size], [cx - size, cy + size], [cx + size, cy + size]],
                          dtype=np.int32)
        cv2.fillPoly(canvas, [points], color)


def render_sample(rng: np.random.Generator, image_size: int) -> Tuple[np.ndarray, List[Dict]]:
    """One image and its visible instances (``label``, boolean ``mask``)."""
    background = rng.integers(40, 200, size=3)
    image = np.clip(background + rng.normal(0, 12, (image_size, image_size, 3)), 0, 255)
    image = image.astype(np.uint8)
    instances = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, len(CLASSES)))
        size = int(rng.integers(image_size // 10, image_size // 4))
        center = tuple(int(v) for v in rng.integers(size, image_size - size, size=2))
        # A colour far from the background, so every shape is visible.
        color = tuple(int(v) for v in (background + 128 + rng.integers(-40, 40, 3)) % 256)
        mask = np.zeros((image_size, image_size), np.uint8)
        _draw_shape(mask, kind, center, size, 1)
        _draw_shape(image, kind, center, size, color)
        for previous in instances:  # later shapes occlude earlier ones
            previous['mask'] &= ~mask.astype(bool)
        instances.append(dict(label=kind, mask=mask.astype(bool)))
    return image, [inst for inst in instances if inst['mask'].sum() >= 16]


def make_shapes_dataset(root: str, num_train: int = 240, num_val: int = 60,
                        image_size: int = 64, seed: int = 0) -> Dict[str, int]:
    """Writes the dataset under ``root`` (skipped if a complete copy is already there).

    Returns:
        dict: number of images per split.
    """
    import cv2
    from pycocotools import mask as mask_utils
    marker = osp.join(root, f'.complete-{num_train}-{num_val}-{image_size}-{seed}')
    if osp.exists(marker):
        return dict(train=num_train, val=num_val)
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        for sub in ('images', 'seg_maps'):
            os.makedirs(osp.join(root, sub, split), exist_ok=True)
        os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image, instances = render_sample(rng, image_size)
            name = f'{index:04d}.png'
            cv2.imwrite(osp.join(root, 'images', split, name), image[..., ::-1])
            seg = np.zeros(image.shape[:2], np.uint8)
            for inst in instances:
                seg[inst['mask']] = inst['label'] + 1
                rle = mask_utils.encode(np.asfortranarray(inst['mask'].astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                rle['counts'] = rle['counts'].decode('ascii')
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=index, category_id=inst['label'] + 1,
                    bbox=[x, y, w, h], area=float(inst['mask'].sum()), segmentation=rle,
                    iscrowd=0))
            cv2.imwrite(osp.join(root, 'seg_maps', split, name), seg)
            images.append(dict(id=index, file_name=name, height=image_size, width=image_size))
        coco = dict(images=images, annotations=annotations,
                    categories=[dict(id=i + 1, name=n) for i, n in enumerate(CLASSES)])
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
    open(marker, 'w').close()
    return dict(train=num_train, val=num_val)
