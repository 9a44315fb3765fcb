"""The streamed stages of a video edit. Each reads its inputs from disk and writes its outputs to disk chunk by chunk
(`editing.cache.Arrays`), so memory stays flat with video length, and each resumes after an interruption from the
chunks already marked done.

    align:  decode -> detect (dlib, FFHQ quad) -> temporal smoothing -> quads; decode again -> crops [N,S,S,3] uint8
    encode: crops -> identity [N,512], landmarks [N,2K], face masks [N,1,S,S]; identity averaged over the frames that
            show a face; DDIM inversion of every frame -> x_T [N,3,S,S]
    render: x_T + (identity, each frame's landmarks) -> DDIM render -> [N,S,S,3] uint8
    write:  decode again -> blend in the face mask -> paste back -> frames/*.png, blend/*.png, out.mp4, side_by_side.mp4
"""
from __future__ import annotations

import itertools
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from editing import core
from editing.cache import Arrays
from editing.distributed import Ranks

SINGLE = Ranks()

CHUNK = 16  # frames per read/write chunk of the streamed stages (crops, masks, x_T of 16 frames: ~13 MB at 256 px)


class StageTimer:
    """Wall-clock seconds per named stage (accumulated), for the run summary and the benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def progress_bar(total: int, desc: str, enabled: bool, unit: str = 'frame'):
    """A tqdm bar, one at a time (never nested, so log files get no cursor movements); Gradio's `track_tqdm` shows
    the same bars in the demo. Away from a terminal it prints at most every 10 s."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 10)


def _todo(arrays: Arrays, stage: str, n: int, log: Callable[[str], None], what: str, ranks: Ranks = SINGLE
          ) -> np.ndarray:
    """The frames of `stage` still to do, this rank's share of them."""
    arrays.begin(stage, n)
    done = arrays.done(stage, n)
    if done.any() and not done.all() and ranks.main:
        log(f'resuming {what}: {int(done.sum())} of {n} frames were done before')
    return ranks.share(np.flatnonzero(~done))


def _runs(todo: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive pieces of at most `size` indices of `todo`."""
    for i in range(0, len(todo), size):
        yield todo[i:i + size]


# --------------------------------------------------------------------------------------------------------------------
# align


def align(source, detector_factory: Callable[[], Callable] | None, arrays: Arrays, size: int,
          center_sigma: float = 1.0, xy_sigma: float = 3.0, progress: bool = True,
          log: Callable[[str], None] = print, ranks: Ranks = SINGLE, timer: StageTimer | None = None) -> None:
    """quads [N,4,2], missing [M] and crops [N,size,size,3] uint8 of a `video_io.FrameSource` into `arrays`.

    detector_factory None: the frames already are aligned square crops (every quad is the whole frame, crops are the
    frames resampled straight to `size`). Else the dlib face track of `faces.detect_faces` + `faces.track_faces`
    (frames without a face get interpolated quads and are listed in `missing`); with several ranks each detects on
    its share of the frames and the detections are gathered, so the track is the single-process one."""
    from faces import crop_face, detect_faces, full_frame_quad, track_faces

    n, timer = len(source), timer or StageTimer()
    if 'quads' not in arrays:
        if detector_factory is None:
            quads, missing = np.repeat(full_frame_quad(*source.size)[None], n, axis=0), []
        else:
            which = ranks.share(np.arange(n))
            with timer('align'):
                faces, tried = detect_faces(source, detector_factory(), which if ranks.enabled else None, progress)
            if ranks.enabled:
                merged: dict[int, list] = {}
                for part, _ in ranks.gather(({int(i): faces[i] for i in which}, tried), 'exchanging the faces'):
                    merged.update(part)
                faces = [merged[i] for i in range(n)]
            alignment = track_faces(faces, center_sigma, xy_sigma, keep_landmarks=False, tried=tried)
            quads, missing = alignment.quads, alignment.missing
        if ranks.main:
            arrays.put('missing', np.asarray(missing, dtype=np.int64))
            arrays.put('quads', quads)
            arrays.create('crops', (n, size, size, 3), np.uint8)
    elif ranks.main:
        arrays.create('crops', (n, size, size, 3), np.uint8)
    ranks.barrier('aligning')
    quads = arrays.read('quads')
    todo = set(_todo(arrays, 'crops', n, log, 'the crops', ranks).tolist())
    first = size if detector_factory is None else 1024  # aligned frames: one resampling straight to `size`
    chunk: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        index = np.array([i for i, _ in chunk])
        arrays.write('crops', index, np.stack([c for _, c in chunk]))
        arrays.mark('crops', index)
        chunk.clear()

    if todo:
        last = max(todo)
        with progress_bar(len(todo), 'crop', progress) as bar, timer('crop'):
            for i, frame in enumerate(frames_from(source, min(todo)), start=min(todo)):
                if i in todo:
                    chunk.append((i, np.asarray(crop_face(frame, quads[i], first, size))))
                    bar.update()
                    if len(chunk) == CHUNK:
                        flush()
                if i >= last:
                    break
            if chunk:
                flush()
    ranks.barrier('cropping')


# --------------------------------------------------------------------------------------------------------------------
# encode


def encode(sampler: core.Sampler, crops: Arrays, arrays: Arrays, missing: np.ndarray, batch_size: int,
           progress: bool = True, log: Callable[[str], None] = print, ranks: Ranks = SINGLE,
           timer: StageTimer | None = None) -> None:
    """id_feats [N,512], lnd_feats [N,2K], masks [N,1,S,S] (uint8 0/1) and x_T [N,3,S,S] into `arrays`.

    The inversion is conditioned, as released, on the UN-normalised average identity with each frame's landmarks;
    the average skips the frames without a face (`missing`), whose features describe no face. With several ranks each
    does its share of the frames; every rank then reads all the features, so the average is the single-process one."""
    model, dtype = sampler.model, sampler.dtype
    n, S = crops.shape('crops')[:2]
    np_dtype = np.dtype(str(dtype).removeprefix('torch.'))
    if ranks.main:
        arrays.create('id_feats', (n, model.encoder.cfg.id_dim), np_dtype)
        arrays.create('lnd_feats', (n, 2 * model.encoder.cfg.n_landmarks), np_dtype)
        arrays.create('masks', (n, 1, S, S), np.uint8)
        arrays.create('x_T', (n, 3, S, S), np_dtype)
    ranks.barrier('encoding')
    timer = timer or StageTimer()
    todo = _todo(arrays, 'features', n, log, 'the encoding', ranks)
    with progress_bar(len(todo), 'encode', progress) as bar, timer('encode'):
        for index in _runs(todo, batch_size):
            x = core.crops_to_float(torch.from_numpy(crops.read('crops', index)), dtype).to(sampler.device)
            ids, lnds = core.identity_features(model, x)
            arrays.write('id_feats', index, ids.to(dtype).cpu().numpy())
            arrays.write('lnd_feats', index, lnds.to(dtype).cpu().numpy())
            arrays.write('masks', index, core.face_masks(model, x, 'video').cpu().numpy().astype(np.uint8))
            arrays.mark('features', index)
            bar.update(len(index))
    ranks.barrier('encoding')
    id_feats = torch.from_numpy(arrays.read('id_feats'))
    z = core.z_faces(model, core.average_identity(id_feats[faces_shown(n, missing)]),
                     torch.from_numpy(arrays.read('lnd_feats'))).to(dtype).cpu()
    todo = _todo(arrays, 'x_T', n, log, 'the inversion', ranks)
    with progress_bar(len(todo) * (sampler.T - 1), f'invert ({len(todo)} frames x {sampler.T - 1} steps)', progress,
                      'step') as bar, timer('invert'):
        for index in _runs(todo, batch_size):
            x = core.crops_to_float(torch.from_numpy(crops.read('crops', index)), dtype)
            arrays.write('x_T', index, sampler.invert(x, z[index], bar.update).numpy())
            arrays.mark('x_T', index)
    ranks.barrier('inverting')


def faces_shown(n: int, missing: np.ndarray) -> np.ndarray:
    """bool [n]: the frames where a face was found (all of them when no frame has one: aligned input)."""
    keep = np.ones(n, bool)
    keep[np.asarray(missing, dtype=np.int64)] = False
    return keep if keep.any() else np.ones(n, bool)


# --------------------------------------------------------------------------------------------------------------------
# render


def render(sampler: core.Sampler, encoded: Arrays, identity: Tensor, arrays: Arrays, batch_size: int,
           desc: str = 'render', progress: bool = True, log: Callable[[str], None] = print,
           keep_float: bool = False, ranks: Ranks = SINGLE) -> None:
    """'render' [N,S,S,3] uint8 into `arrays`: every frame rendered from its x_T with `identity` [1,512] and its own
    landmarks (and 'render_float' [N,3,S,S] in [-1,1] in the loop dtype with keep_float, for exact checks)."""
    n, _, S, _ = encoded.shape('x_T')
    z = core.z_faces(sampler.model, identity, torch.from_numpy(encoded.read('lnd_feats'))).to(sampler.dtype).cpu()
    if ranks.main:
        arrays.create('render', (n, S, S, 3), np.uint8)
        if keep_float:
            arrays.create('render_float', (n, 3, S, S), np.dtype(str(sampler.dtype).removeprefix('torch.')))
    ranks.barrier('rendering')
    todo = _todo(arrays, 'render', n, log, desc, ranks)
    steps = sampler.render_steps
    with progress_bar(len(todo) * steps, f'{desc} ({len(todo)} frames x {steps} steps)', progress, 'step') as bar:
        for index in _runs(todo, batch_size):
            x0 = sampler.render(torch.from_numpy(encoded.read('x_T', index)), z[index], bar.update)
            arrays.write('render', index, core.to_uint8(x0).numpy())
            if keep_float:
                arrays.write('render_float', index, x0.numpy())
            arrays.mark('render', index)
    ranks.barrier('rendering')


# --------------------------------------------------------------------------------------------------------------------
# write


def side_by_side(panels: list[np.ndarray], height: int = 512) -> np.ndarray:
    from PIL import Image

    h = min(height, panels[0].shape[0])
    out = []
    for p in panels:
        w = round(p.shape[1] * h / p.shape[0])
        out.append(np.asarray(Image.fromarray(p).resize((w, h), Image.BILINEAR)) if p.shape[0] != h else p)
    return np.concatenate(out, axis=1)


def frames_from(source, first: int) -> Iterator[np.ndarray]:
    """The frames of `source` from index `first` on (a FrameSource skips the earlier ones cheaply)."""
    skip = getattr(source, 'iter_from', None)
    return skip(first) if skip is not None else itertools.islice(iter(source), first, None)


def write(source, names: list[str], crops: Arrays, encoded: Arrays, edits: list[tuple[Path, Arrays]],
          out_root: Path, fps: float, audio=None, blend: str = 'hard', feather: float = 3.0,
          recon: Arrays | None = None, edit_frames: np.ndarray | None = None, save_frames: bool = True,
          timer: StageTimer | None = None, progress: bool = True, ranks: Ranks = SINGLE) -> None:
    """Blend, paste back and write every edit in ONE streamed pass over the source frames.

    edits: (staging folder, arrays holding 'render') per edit. Per folder: frames/<name>.png (full frames; only
    with save_frames), blend/<name>.png (the crop composite, released `paste_avg_mani`), out.mp4 and
    side_by_side.mp4 (original | reconstruction if any | edit) at `fps` with `audio`. The crops go to
    <out_root>/crops/, the reconstruction's frames to <out_root>/recon/. edit_frames (bool [N]): the frames that get
    the edit; the others stay as they are (frames without a face). With several ranks each pastes its contiguous
    share of the frames, writes their PNGs and encodes them as one segment of each video; rank 0 then joins the
    segments without re-encoding (video_io.join_videos) and adds the sound."""
    from faces import paste_back
    from video_io import VideoWriter, join_videos, save_image_atomic

    timer = timer or StageTimer()
    n = len(names)
    share = ranks.share(np.arange(n))  # contiguous
    edit_frames = np.ones(n, bool) if edit_frames is None else edit_frames
    sigma = feather if blend == 'feather' else 0.0
    quads = crops.read('quads')
    if ranks.main:
        (out_root / 'crops').mkdir(parents=True, exist_ok=True)
        if recon is not None:
            (out_root / 'recon').mkdir(exist_ok=True)
        for folder, _ in edits:
            (folder / 'blend').mkdir(parents=True, exist_ok=True)
            if save_frames:
                (folder / 'frames').mkdir(exist_ok=True)
    ranks.barrier('writing')

    def segment(folder: Path, name: str, rank: int) -> Path:  # one rank's part of a video (hidden until joined)
        return folder / f'.{name}.rank{rank:04d}.mp4'

    videos = ('out.mp4', 'side_by_side.mp4')
    writers = [tuple(VideoWriter(segment(folder, v, ranks.rank), fps) if ranks.enabled else
                     VideoWriter(folder / v, fps, audio=audio) for v in videos)
               for folder, _ in edits] if len(share) else []
    # PNG encoding (zlib releases the GIL) runs in threads beside the pasting and the video encoders
    pool, pending = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)), deque()

    def save(path: Path, image: np.ndarray) -> None:
        pending.append(pool.submit(save_image_atomic, path, image))
        while len(pending) > 8:  # bounded: at most 8 images wait in memory (1080p: 6 MB each)
            pending.popleft().result()

    frames = frames_from(source, int(share[0]) if len(share) else n)
    try:
        with progress_bar(len(share), 'paste back', progress) as bar:
            for lo in range(int(share[0]), int(share[-1]) + 1, CHUNK) if len(share) else ():
                sl = slice(lo, min(int(share[-1]) + 1, lo + CHUNK))
                crop_u8, masks = crops.read('crops', sl), encoded.read('masks', sl)
                renders = [a.read('render', sl) for _, a in edits]
                recon_u8 = recon.read('render', sl) if recon is not None else None
                for j, i in enumerate(range(sl.start, sl.stop)):
                    with timer('decode'):
                        frame = next(frames)
                    with timer('paste'):
                        m = masks[j, 0].astype(np.float32)
                        paste = (lambda r: paste_back(frame, r, quads[i], m, sigma)) if edit_frames[i] else \
                            (lambda r: frame)
                        recon_frame = paste(recon_u8[j]) if recon_u8 is not None else None
                        outs = [paste(r[j]) for r in renders]
                        src = torch.from_numpy(crop_u8[j:j + 1])
                        blends = [core.to_uint8(core.blend(core.crops_to_float(torch.from_numpy(r[j:j + 1])),
                                                           core.crops_to_float(src), torch.from_numpy(m[None, None])
                                                           ) * 2 - 1)[0].numpy() if edit_frames[i] else crop_u8[j]
                                  for r in renders]
                    with timer('write'):
                        save(out_root / 'crops' / f'{names[i]}.png', crop_u8[j])
                        if recon_frame is not None:
                            save(out_root / 'recon' / f'{names[i]}.png', recon_frame)
                        for out, blended, (folder, _) in zip(outs, blends, edits):
                            if save_frames:
                                save(folder / 'frames' / f'{names[i]}.png', out)
                            save(folder / 'blend' / f'{names[i]}.png', blended)
                        for out, (writer, sbs) in zip(outs, writers):
                            writer.write(out)
                            sbs.write(side_by_side([frame] + ([recon_frame] if recon_frame is not None else [])
                                                   + [out]))
                    bar.update()
        with timer('write'):
            while pending:
                pending.popleft().result()
            for writer, sbs in writers:
                writer.close()
                sbs.close()
        if ranks.enabled:
            ranks.barrier('encoding the video segments')
            if ranks.main:
                with timer('join'):
                    ranks_with_frames = [r for r in range(ranks.world) if len(ranks.share(np.arange(n), r))]
                    for (folder, _), v in ((e, v) for e in edits for v in videos):
                        parts = [segment(folder, v, r) for r in ranks_with_frames]
                        join_videos(parts, folder / v, audio)
                        for part in parts:
                            part.unlink()
    except BaseException:
        for f in pending:
            f.cancel()
        for writer, sbs in writers:
            writer.abort()
            sbs.abort()
        raise
    finally:
        pool.shutdown(wait=True)
    ranks.barrier('writing')


def publish(staging: Path, final: Path) -> Path:
    """Move a finished result folder into place (the caller checked --overwrite before any work)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def summary_of(names: list[str], missing: list[int], hits: dict[str, bool], timer: StageTimer,
               outputs: list[Path], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {'frames': len(names), 'faces_missing': [names[i] for i in missing], 'cache_hits': hits,
            'seconds': {k: round(v, 3) for k, v in timer.seconds.items()}, 'outputs': [str(p) for p in outputs],
            **(extra or {})}
