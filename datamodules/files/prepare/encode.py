"""The ``litdata.optimize`` function (:class:`Encoder`): one work unit -> stored samples. Each image is decoded and
checked, then encoded with its flip by the frozen VAE in batches; each text is tokenized, a caption that cannot
fit truncated and a long document split between segments (never inside an image)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from datamodules.files.decode import BadSample, load_image
from datamodules.files.prepare.settings import Settings
from datamodules.files.records import ImageRef, Record, Skips
from datamodules.files.schema import IMAGE, INTERLEAVED, PAIR, TEXT, Sample

# Counted but not skipped: the sample is written, changed as named.
NOTES = ("caption_truncated", "document_split")


def decode_image(ref: ImageRef, s: Settings) -> np.ndarray:
    """uint8 ``[S, S, 3]``, decoded as every stored image is; a BadSample names the image (``where``)."""
    try:
        return load_image(ref, s.image_size, min_size=s.min_image_size, max_aspect=s.max_aspect_ratio,
                          background=tuple(s.background))
    except BadSample as e:
        e.where = ref.name
        raise


class Encoder:
    """The ``litdata.optimize`` function: one work unit (a shard, or a list of records) -> stored samples.

    Runs in worker processes; the VAE and tokenizer load once per process. Skips and notes of each unit are
    appended to a JSON-lines file per process in ``tally_dir`` (workers cannot return them otherwise).
    """

    def __init__(self, settings: Settings, split: str, tally_dir: str):
        self.s, self.split, self.tally_dir = settings, split, tally_dir
        self._codec = None
        self._tokenizer = None
        self._tally_file = None

    # ------------------------------------------------------------------------------------ per process
    def _load(self):
        if self._codec is None:
            import torch

            from lit_transfusion.tokenizer import TextTokenizer
            from lit_transfusion.vae import LatentCodec

            if self.s.threads:  # 0: in the calling process, whose thread count stays as it is
                torch.set_num_threads(self.s.threads)
            self._codec = LatentCodec.from_dir(self.s.vae_path)
            self._tokenizer = TextTokenizer.from_file(self.s.tokenizer_file)
            self._tally_file = Path(self.tally_dir) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        return self._codec, self._tokenizer

    @property
    def patches_per_image(self) -> int:
        _, h, w = self.s.latent_shape()
        return (h // self.s.patch_size) * (w // self.s.patch_size)

    def __call__(self, unit) -> Iterator[dict]:
        codec, tok = self._load()
        skips, notes = Skips(), Skips()
        written = {"samples": 0, "images": 0, "tokens": 0, "tokens_per_use": 0}
        pending: list[tuple[Record, list]] = []  # (record, its decoded pieces) waiting for one batched VAE call
        n_images = 0
        for record in unit.records(skips):
            pieces = self._decode(record, tok, skips, notes)
            if not pieces:
                continue
            pending.append((record, pieces))
            n_images += sum(len(p[2]) for p in pieces)
            if n_images >= self.s.encode_batch:
                yield from self._encode(pending, codec, written)
                pending, n_images = [], 0
        yield from self._encode(pending, codec, written)
        with open(self._tally_file, "a") as f:
            f.write(json.dumps({"skips": skips.to_dict(), "notes": notes.to_dict(), **written}) + "\n")

    # ---------------------------------------------------------------------------------------- decode
    def _decode(self, record: Record, tok, skips: Skips, notes: Skips) -> list[tuple]:
        """A record -> ``[(kind, segments, images)]``, one entry per stored sample (a long document gives
        several): segments are token-id lists (PAIR: the alternative captions) or IMAGE markers, images uint8
        ``[S, S, 3]`` arrays. ``[]`` when the record is skipped (counted in ``skips``)."""
        s = self.s
        image_positions = self.patches_per_image + 2
        try:
            if record.kind == "pair":
                image = decode_image(record.segments[0], s)
                room = s.seq_len - 2 - image_positions  # <bos> caption <boi> ... <eoi> <eos>
                captions = []
                for text in record.captions:
                    ids = tok.encode(text)
                    if len(ids) > room:
                        ids = ids[:room]
                        notes.add("caption_truncated", record.key)
                    if ids:
                        captions.append(ids)
                if not captions:
                    raise BadSample("empty_caption")
                return [(PAIR, captions, [image])]
            if record.kind == "interleaved":
                segments: list = []
                images = []
                for seg in record.segments:
                    if isinstance(seg, ImageRef):
                        images.append(decode_image(seg, s))
                        segments.append(IMAGE)
                    else:
                        ids = tok.encode(seg)
                        if ids:
                            segments.append(ids)
                pieces = split_document(segments, images, s.seq_len - 2, image_positions)
                if pieces is None:
                    raise BadSample("document_too_long")
                if len(pieces) > 1:
                    notes.add("document_split", record.key)
                return [(INTERLEAVED, segs, imgs) for segs, imgs in pieces]
            if record.kind == "text":
                ids = tok.encode(record.segments[0])
                if not ids:
                    raise BadSample("empty_caption")
                room = s.seq_len - 2
                if len(ids) > room:
                    notes.add("document_split", record.key)
                return [(TEXT, [ids[i : i + room]], []) for i in range(0, len(ids), room)]
            raise ValueError(f"unknown record kind {record.kind!r}")
        except BadSample as e:
            skips.add(e.reason, getattr(e, "where", None) or record.key)
            return []

    # ---------------------------------------------------------------------------------------- encode
    def _encode(self, pending: list[tuple[Record, list]], codec, written: dict) -> Iterator[dict]:
        """Encode every image of ``pending`` in one batched VAE call (and the flips), then yield the items."""
        import torch

        from lit_transfusion.vae import images_to_tensor

        all_images = [img for _, pieces in pending for _, _, imgs in pieces for img in imgs]
        if all_images:
            x = images_to_tensor(np.stack(all_images))  # [N, 3, S, S] in [-1, 1]
            if self.s.flip:
                x = torch.cat([x, x.flip(-1)])
            mean, logvar = codec.encode_distribution(x, batch_size=max(self.s.encode_batch, 1))
            n = len(all_images)
            F = 2 if self.s.flip else 1
            # [F*N, C, h, w] -> [N, F, C, h, w]: the image and its flip side by side
            mean = mean.view(F, n, *mean.shape[1:]).transpose(0, 1).numpy()
            logvar = logvar.view(F, n, *logvar.shape[1:]).transpose(0, 1).numpy()
        cursor = 0
        C, h, w = self.s.latent_shape()
        F = 2 if self.s.flip else 1
        for record, pieces in pending:
            for p, (kind, segments, imgs) in enumerate(pieces):
                k = len(imgs)
                texts = [seg for seg in segments if not isinstance(seg, int)]  # an int is the IMAGE marker
                lengths = [IMAGE if isinstance(seg, int) else len(seg) for seg in segments]
                tokens = np.concatenate([np.asarray(t, dtype=np.int32) for t in texts]) if texts else np.zeros(
                    0, np.int32)
                if k:
                    m, lv = mean[cursor : cursor + k], logvar[cursor : cursor + k]
                else:
                    m = lv = np.zeros((0, F, C, h, w), np.float16)
                sample = Sample(
                    key=record.key if len(pieces) == 1 else f"{record.key}#{p}",
                    kind=kind, tokens=tokens, segments=np.asarray(lengths, np.int32), mean=m, logvar=lv,
                    pixels=(np.stack(imgs) if k else np.zeros((0, self.s.image_size, self.s.image_size, 3),
                                                               np.uint8)) if self.split == "val" else None,
                )
                cursor += k
                written["samples"] += 1
                written["images"] += k
                written["tokens"] += int(tokens.size)
                written["tokens_per_use"] += round(tokens.size / len(segments)) if kind == PAIR else int(tokens.size)
                yield sample.to_item()


def split_document(segments: list, images: list, room: int, image_positions: int):
    """Greedy split of an interleaved document (token-id lists and IMAGE markers, in order) into pieces of at most
    ``room`` positions, cutting only between segments or inside a text segment, never inside an image.
    Returns ``[(segments, images)]``, or None if one image alone does not fit."""
    if image_positions > room:
        return None if images else [(list(segments), [])] if segments else []
    pieces, cur, cur_imgs, used, img_i = [], [], [], 0, 0
    for seg in segments:
        if isinstance(seg, int):  # IMAGE
            if used + image_positions > room:
                pieces.append((cur, cur_imgs))
                cur, cur_imgs, used = [], [], 0
            cur.append(IMAGE)
            cur_imgs.append(images[img_i])
            img_i += 1
            used += image_positions
            continue
        ids = list(seg)
        while ids:
            take = room - used
            if take <= 0:
                pieces.append((cur, cur_imgs))
                cur, cur_imgs, used = [], [], 0
                continue
            cur.append(ids[:take])
            used += len(ids[:take])
            ids = ids[take:]
    if cur:
        pieces.append((cur, cur_imgs))
    return [p for p in pieces if p[0]]
