"""Fixtures of the authors' image path under transformers 4.45.2: tests/fixtures/images_tf4452.npz.

The released PPLLaVA was trained and is served with transformers 4.45.2 (the authors' `requirement.txt`); its
`LlavaNextImageProcessor` differs from transformers 5.x on non-square images (PIL resizing; `_pad_for_patching` pads
`(target - new) // 2` on both sides, so an odd remainder leaves the canvas one pixel short and the last crop row or
column is stretched back to S x S in `_preprocess`), and its `unpad_image` truncates with `int()` where 5.x rounds
first. This script runs the 4.45.2 code itself, in a side environment (never the project's, never committed):

    python3 -m venv SIDE && SIDE/bin/pip install torch==2.13.0 transformers==4.45.2 einops==0.8.1 numpy==1.26.4 pillow==11.3.0
    ppllava-edge make-checkpoint --preset tiny --seed 0 CKPT          # in the project's environment
    PYTHONPATH=src SIDE/bin/python tools/make_image_fixtures.py --checkpoint CKPT \\
        --authors-meta PPLLAVA/ppllava/models/llava_interleave_meta.py --out tests/fixtures/images_tf4452.npz

PPLLAVA is a checkout of github.com/farewellthree/PPLLaVA (the fixture was made from commit d5766c8);
`--authors-meta` is their `encode_image` module, imported as is (it needs only torch, einops and transformers'
llava_next helpers). The side environment imports ppllava_edge from `src` only for the model's tower, projector,
Llama module tree and tokenizers; the tiles, the assembly and the generation loop are 4.45.2's and the authors'.
(The tiles come out bit-identical with the project's Pillow 12.0.0: the tests compare them exactly.)

What it writes, for a landscape (200x120), a square (100x100) and a portrait (90x150) picture (kept as PNG bytes):
- `{name}/png`, `{name}/image_size` (the processor's `image_sizes`), `{name}/best_resolution`;
- the tiny preset's tiles (84 px, the released grids at 84 px): `{name}/tiles_u8` (uint8 levels; the script checks
  that `float32(u8 * (1/255))` normalised as 4.45's `rescale` + `normalize` gives the processor's float32 tiles
  bit for bit) and `{name}/tiles_sha256` (of those float32 bytes);
- the released config's tiles (336 px): `{name}/tiles336_sha256`, `{name}/tiles336_shape`, `{name}/best336`;
- the authors' path on the tiny checkpoint: their `encode_image` (4.45's `get_anyres_image_grid_shape`,
  `unpad_image`, `image_newline`) over 4.45's tiles, with the tower and projector of our model (they are tested
  against independent ports elsewhere); the image tokens spliced at the image token; 4.45.2's LlamaForCausalLM greedy
  `generate` (16 new tokens): `{name}/question`, `{name}/visual_tokens`, `{name}/output_ids`, `{name}/input_ids`,
  `{name}/clip_ids` (questions chosen so that 5.x's tiles give other ids on this checkpoint);
- `sweep/{tiny,released}`: int32 rows (h, w, best_h, best_w, y0, rows, x0, cols) of the kept crop map from 4.45's
  `select_best_resolution`, `get_anyres_image_grid_shape` and `unpad_image` over a grid of image sizes plus sizes
  where `int()` and 5.x's `int(round(x, 7))` differ;
- `checkpoint_sha256`: sha256 over the tiny checkpoint's shard files (the test refuses a changed preset).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

MAX_NEW_TOKENS = 16
IMAGES = {"landscape": (200, 120), "square": (100, 100), "portrait": (90, 150)}  # (W, H)
# questions under which transformers 5.x's tiles give other greedy ids on the tiny checkpoint (the test can fail)
QUESTIONS = {"landscape": "Describe the image.", "square": "What is in the picture?", "portrait": "What is on the left?"}
RELEASED_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# sizes (H, W) where 4.45's int() and 5.x's int(round(x, 7)) in unpad_image keep different windows
TRICKY = {
    "tiny": [(49, 294), (98, 588), (103, 618), (107, 642), (147, 196), (161, 966), (187, 1122), (196, 147), (196, 1176), (197, 1182)],
    "released": [(49, 1176), (94, 752), (147, 1176), (343, 1176), (392, 1127), (637, 784), (735, 784), (752, 94), (784, 637), (784, 735)],
}


def processor(tile: int, pinpoints):
    from transformers import LlavaNextImageProcessor

    # llava-v1.6's preprocessor_config.json at `tile` px (bicubic, CLIP mean/std, centre crop)
    return LlavaNextImageProcessor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                   image_grid_pinpoints=[list(p) for p in pinpoints], resample=3, do_center_crop=True)


def as_uint8(pv: np.ndarray, proc) -> np.ndarray:
    """The uint8 levels behind normalised tiles; raises unless 4.45's rescale + normalize of them is bit-exact."""
    mean = np.asarray(proc.image_mean, np.float32)[:, None, None]
    std = np.asarray(proc.image_std, np.float32)[:, None, None]
    u8 = np.clip(np.rint((pv * std + mean) * 255), 0, 255).astype(np.uint8)
    again = (((u8 * (1 / 255)).astype(np.float32)) - mean) / std  # image_transforms.rescale (float64 -> float32), normalize
    if not np.array_equal(again, pv):
        raise SystemExit("the tiles are not uint8 levels normalised as 4.45 does; cannot store them as uint8")
    return u8


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def sweep(tile: int, pooled: int, pinpoints, tricky) -> np.ndarray:
    """(h, w, best_h, best_w, y0, rows, x0, cols) of the kept crop map per size, from 4.45's own helpers on a labelled feature map."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    sizes = sorted({(h, w) for h in range(1, 1200, 17) for w in range(1, 1200, 17)} | set(tricky))
    rows = []
    for h, w in sizes:
        bh, bw = select_best_resolution((h, w), pinpoints)
        nh, nw = get_anyres_image_grid_shape(torch.tensor([h, w]), pinpoints, tile)  # a tensor, as encode_image passes it
        ch, cw = nh * pooled, nw * pooled
        lab = torch.arange(ch * cw).reshape(1, ch, cw)
        kept = unpad_image(lab, torch.tensor([h, w]))
        y0, x0 = divmod(int(kept[0, 0, 0]), cw) if kept.numel() else (-1, -1)  # -1: nothing kept (a 1000x3 sliver)
        rows.append((h, w, bh, bw, y0, kept.shape[1], x0, kept.shape[2]))
    return np.asarray(rows, dtype=np.int32)


class _Tower:
    """The authors' `self.vision_tower(px, output_hidden_states=True).hidden_states[layer]` over our tower: each tile
    with T = 1 (the BT-Adapter's 4-D input), a zero CLS row in front (dropped by the 'default' strategy)."""

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer

    def __call__(self, px, output_hidden_states=True):
        f = self.model.encode_tiles(px)
        states = {self.layer: torch.cat((torch.zeros_like(f[:, :1]), f), dim=1)}
        return type("Out", (), {"hidden_states": states})()


class _Projector:
    """`multi_modal_projector(features, clip_ids, clip_mask, N, video=False)` -> [1, N*g*g, D] over our projector."""

    def __init__(self, model):
        self.model = model

    def __call__(self, feats, clip_ids, clip_mask, n, video):
        proj = self.model.multi_modal_projector
        _, tokens = proj.pool(proj.keys(feats), proj.values(feats), clip_ids, image=not video)
        return tokens[None]


def load_tiny(ckpt: Path):
    """Our module tree with the checkpoint's weights (fp32), built in this environment (transformers 4.45.2)."""
    from safetensors.torch import load_file

    from ppllava_edge.config import load_config
    from ppllava_edge.model.ppllava import PPLLaVAForConditionalGeneration

    model = PPLLaVAForConditionalGeneration(load_config(ckpt))
    state = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        state.update({k: v.float() for k, v in load_file(shard).items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("inv_freq" not in k for k in missing):
        raise SystemExit(f"checkpoint does not fit: missing {missing}, unexpected {unexpected}")
    return model.float().eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="ppllava-edge make-checkpoint --preset tiny --seed 0 CKPT")
    ap.add_argument("--authors-meta", type=Path, required=True, help="PPLLaVA/ppllava/models/llava_interleave_meta.py")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if transformers.__version__ != "4.45.2":
        raise SystemExit(f"run this in the side environment with transformers 4.45.2 (found {transformers.__version__})")

    from ppllava_edge.media import make_test_photo
    from ppllava_edge.tokenization import ClipTokenizer, LlamaPromptTokenizer, load_llama_tokenizer_from_checkpoint

    spec = importlib.util.spec_from_file_location("authors_meta", args.authors_meta)
    meta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta)
    model = load_tiny(args.checkpoint)
    cfg = model.cfg
    llama = LlamaPromptTokenizer(load_llama_tokenizer_from_checkpoint(args.checkpoint), image_token_id=cfg.image_token_index,
                                 template=cfg.conversation)
    clip = ClipTokenizer()

    tile, tiny_pins = cfg.vision.image_size, [list(p) for p in cfg.image_grid_pinpoints]
    pooled = cfg.image_pooled_grid
    authors = type("Authors", (meta.LlavaInterleaveMetaForConditionalGeneration,), {})()
    authors.vision_tower = _Tower(model, -1)
    authors.vision_feature_layer, authors.vision_feature_select_strategy, authors.pooling = -1, "default", "ppllava"
    authors.multi_modal_projector = _Projector(model)
    authors.image_newline = model.image_newline
    authors.config = type("Cfg", (), {"image_grid_pinpoints": tiny_pins, "vision_config": type("V", (), {"image_size": tile})()})()

    out: dict[str, np.ndarray] = {}
    p84, p336 = processor(tile, tiny_pins), processor(336, RELEASED_PINPOINTS)
    for seed, (name, (w, h)) in enumerate(IMAGES.items()):
        buf = io.BytesIO()
        Image.fromarray(make_test_photo(w, h, seed=100 + seed, noise=6.0)).save(buf, format="PNG", optimize=True)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # as the authors' upload_img loads a file
        b = p84(img, return_tensors="pt")
        pv, size = b["pixel_values"], b["image_sizes"][0]  # [1, N, 3, S, S], tensor([H, W])
        from transformers.image_processing_utils import select_best_resolution

        out[f"{name}/png"] = np.frombuffer(buf.getvalue(), np.uint8)
        out[f"{name}/image_size"] = size.numpy().astype(np.int32)
        out[f"{name}/best_resolution"] = np.asarray(select_best_resolution(tuple(size.tolist()), tiny_pins), np.int32)
        out[f"{name}/tiles_u8"] = as_uint8(pv[0].numpy(), p84)
        out[f"{name}/tiles_sha256"] = np.asarray(sha(pv[0].numpy()))
        r = p336(img, return_tensors="np")
        out[f"{name}/tiles336_sha256"] = np.asarray(sha(r["pixel_values"][0]))
        out[f"{name}/tiles336_shape"] = np.asarray(r["pixel_values"][0].shape, np.int32)
        out[f"{name}/best336"] = np.asarray(select_best_resolution(tuple(size.tolist()), RELEASED_PINPOINTS), np.int32)
        clip_ids = clip.encode(QUESTIONS[name], length=cfg.clip_text.context_length)  # as ReferenceModel.tokenize
        input_ids = np.asarray(llama.prompt_ids(QUESTIONS[name]), dtype=np.int64)
        with torch.no_grad():
            vis = authors.encode_image(pv, size, torch.from_numpy(clip_ids)[None], None)[0]
            embeds = model.embed_prompt(torch.from_numpy(input_ids), vis)
            ids = model.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long),
                                                max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                                eos_token_id=cfg.text.eos_token_id, pad_token_id=cfg.pad_token_id)[0]
        out[f"{name}/visual_tokens"] = vis.float().numpy()
        out[f"{name}/output_ids"] = ids.numpy().astype(np.int64)
        out[f"{name}/input_ids"], out[f"{name}/clip_ids"] = input_ids, clip_ids
        out[f"{name}/question"] = np.asarray(QUESTIONS[name])
        print(f"{name}: {w}x{h} -> best {out[f'{name}/best_resolution'].tolist()}, tiles {list(pv.shape[1:])}, "
              f"{vis.shape[0]} visual tokens, ids {ids.tolist()}", file=sys.stderr)
    out["sweep/tiny"] = sweep(tile, pooled, tiny_pins, TRICKY["tiny"])
    out["sweep/released"] = sweep(336, 8, RELEASED_PINPOINTS, TRICKY["released"])
    digest = hashlib.sha256()
    for shard in sorted(args.checkpoint.glob("*.safetensors")):
        digest.update(shard.read_bytes())
    out["checkpoint_sha256"] = np.asarray(digest.hexdigest())
    out["meta"] = np.asarray(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                         "max_new_tokens": MAX_NEW_TOKENS, "authors_meta": str(args.authors_meta.name)}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **out)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
