"""The editing pipeline shared by editing_classifier.py and editing_CLIP.py.

    frames -> align (dlib, FFHQ quad, temporal smoothing) -> crops -> encode (identity averaged over the video,
    landmarks and face mask per frame) -> DDIM-invert every frame ONCE (cached) -> for each edit: move the identity,
    render with DDIM -> blend inside the face mask -> paste back into the full frames -> PNGs + out.mp4 + side-by-side.

Alignment and inversion are cached on disk keyed by the frame bytes, the selection, the alignment settings, the
checkpoint and T, so a second edit of the same video costs one DDIM render per frame (T network calls). While the
inversion or a render runs, every finished batch is saved (`resumable_batches`, `Cache.partial_dir`), so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch import Tensor

from cli import software_versions, torch_save, write_json
from diffusion import NoiseSchedule, space_timesteps
from editing import core
from editing.cache import Cache, file_stamp, hash_files, make_key

EditNorm = Literal['unit', 'source']
FRAME_RAM_BUDGET = 2 << 30  # decoded frames are kept between stages when they fit in this many bytes


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


@dataclass
class Runtime:
    """What every stage needs: the EMA model, where and how to run it, and the DDIM schedule for --T."""

    model: torch.nn.Module
    checkpoint: Path
    device: torch.device
    T: int
    batch_size: int = 4
    precision: str = 'fp32'
    progress: bool = True
    micro_batch: int | None = None  # network slice size inside a batch (CPU: 1, see editing.speed.micro_batch_size)
    decoder: Literal['ddim', 'dpm++2m'] = 'ddim'  # renderer from x_T; the inversion is always DDIM
    decoder_steps: int | None = None  # network calls of the dpm++2m decoder (None: T)
    decoder_spacing: Literal['time', 'logsnr'] = 'time'
    schedule: NoiseSchedule = field(init=False)

    def __post_init__(self) -> None:
        self.schedule = NoiseSchedule.linear(self.model.cfg.diffusion.num_timesteps, self.model.cfg.diffusion.beta_start,
                                             self.model.cfg.diffusion.beta_end).respace(self.T)

    @property
    def image_size(self) -> int:
        return self.model.cfg.unet.image_size

    def invert(self, crops: Tensor, z_face: Tensor, on_batch: Callable[[slice, Tensor], None] | None = None) -> Tensor:
        """`core.invert` with this runtime's schedule, batching, device, precision and micro-batching."""
        return core.invert(self.model, crops, z_face, self.schedule, self.batch_size, self.device, self.precision,
                           self.progress, self.micro_batch, on_batch)

    def render(self, x_T: Tensor, z_face: Tensor, desc: str = 'render',
               on_batch: Callable[[slice, Tensor], None] | None = None) -> Tensor:
        """`core.render` with this runtime's settings, its decoder included."""
        return core.render(self.model, x_T, z_face, self.schedule, self.batch_size, self.device, self.precision,
                           self.progress, desc, self.micro_batch, self.decoder, self.decoder_steps,
                           self.decoder_spacing, on_batch)


def check_T(T: int, num_timesteps: int = 1000) -> int:
    """Validate --T up front (before any heavy work); SystemExit with the nearest valid values otherwise."""
    try:
        space_timesteps(num_timesteps, T)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return T


@dataclass
class EncodedVideo:
    """Everything an edit needs, computed once per (video, checkpoint, T).

    crops: [N,S,S,3] uint8 aligned crops; quads: [N,4,2] frame-pixel quads; id_feats [N,512]; lnd_feats [N,2K];
    masks: [N,1,S,S] face masks (video background classes); x_T: [N,3,S,S] DDIM inversions conditioned on the
    averaged identity; missing: frames where no face was found (quads interpolated).
    """

    names: list[str]
    quads: np.ndarray
    missing: list[int]
    crops: Tensor
    id_feats: Tensor
    lnd_feats: Tensor
    masks: Tensor
    x_T: Tensor
    cache_hits: dict[str, bool] = field(default_factory=dict)
    frames: list[np.ndarray] | None = None  # decoded frames, kept when they fit in FRAME_RAM_BUDGET
    key: str | None = None  # cache key of the inversion (names the partial renders of this video)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def avg_id(self) -> Tensor:
        return core.average_identity(self.id_feats)

    def crops_float(self) -> Tensor:
        """[N,3,S,S] in [-1,1]."""
        return crops_to_float(self.crops)


def crops_to_float(crops: Tensor) -> Tensor:
    return crops.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: Tensor) -> Tensor:
    """[N,3,S,S] in [-1,1] -> [N,S,S,3] uint8."""
    return (core.to_unit(x).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Encoding


def encode_crops(rt: Runtime, crops: Tensor, timer: StageTimer | None = None, partial: Path | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Tensor]:
    """Identity, landmarks, masks and the DDIM inversion of crops [N,3,S,S] in [-1,1] (the released conventions:
    the inversion is conditioned on the UN-normalised average identity with each frame's landmarks).

    partial: a folder where every inverted batch is saved as it completes (`resumable_batches`); frames found there
    are not inverted again, so an interrupted inversion resumes where it stopped (any batch size)."""
    timer = timer or StageTimer()
    with timer('encode'):
        id_feats, lnd = core.encode_frames(rt.model, crops, rt.batch_size, rt.device, rt.progress)
        masks = core.face_masks(rt.model, crops, rt.batch_size, rt.device, 'video')
        z_avg = core.z_faces(rt.model, core.average_identity(id_feats), lnd, rt.device)
    with timer('invert'):
        x_T = resumable_batches(
            partial, crops.shape, 'the inversion', log,
            lambda todo, on_batch: rt.invert(crops[todo], z_avg[todo], on_batch))
    return {'id_feats': id_feats, 'lnd_feats': lnd, 'masks': masks, 'x_T': x_T}


def resumable_batches(partial: Path | None, shape: torch.Size, what: str, log: Callable[[str], None],
                      compute: Callable[[Tensor, Callable[[slice, Tensor], None] | None], Tensor]) -> Tensor:
    """A per-frame result of `shape` [N,...] computed batch by batch with every batch saved in `partial` as it
    completes ({'index', 'out'} files), so that an interrupted computation resumes where it stopped (with any batch
    size). compute(todo, on_batch) returns the results of the frames `todo` and calls on_batch(sl, out[sl]) after
    each batch, sl indexing `todo`. Without `partial` nothing is saved; when saving fails (full disk, read-only
    folder) the computation goes on unsaved, with a warning."""
    out, done = torch.zeros(shape), torch.zeros(shape[0], dtype=torch.bool)
    for f in sorted(partial.glob('*.pt')) if partial is not None and partial.is_dir() else []:
        try:
            piece = torch.load(f, map_location='cpu', weights_only=True)
            index, value = piece['index'], piece['out']
            if value.shape[1:] != shape[1:] or len(index) != len(value) or int(index.max()) >= shape[0]:
                continue
        except Exception:  # noqa: BLE001 - a damaged piece is recomputed, never trusted
            continue
        out[index], done[index] = value, True
    todo = torch.nonzero(~done).flatten()
    if done.any():
        log(f'resuming {what}: {int(done.sum())} of {shape[0]} frames were done before ({partial})')

    failed: list[OSError] = []

    def save(sl: slice, value: Tensor) -> None:
        if failed:
            return
        try:
            partial.mkdir(parents=True, exist_ok=True)
            torch_save({'index': todo[sl].clone(), 'out': value}, partial / f'{int(todo[sl][0]):07d}-{os.getpid()}.pt')
        except OSError as e:
            failed.append(e)
            warnings.warn(f'cannot save the finished batches of {what} in {partial} ({e}); an interruption will '
                          'start it over', stacklevel=2)

    if len(todo):
        out[todo] = compute(todo, save if partial is not None else None)
    return out


def source_fingerprint(source) -> str:
    files = source.files if not source.is_video else [source.path]
    return make_key(content=hash_files(files), names=list(source.names))


def encode_video(
    source,
    rt: Runtime,
    detector_factory: Callable[[], Callable],
    cache: Cache,
    center_sigma: float = 1.0,
    xy_sigma: float = 3.0,
    timer: StageTimer | None = None,
    log: Callable[[str], None] = print,
    aligned_input: bool = False,
) -> EncodedVideo:
    """Align, crop, encode and invert a `video_io.FrameSource`, reusing cached results where they exist.

    With `aligned_input` the frames already are aligned square face crops (FFHQ-style): no detection, every quad is
    the whole frame (`faces.full_frame_quad`), and the crops are the frames resampled to the model's size."""
    from faces import align_video, crop_face, full_frame_quad

    timer = timer or StageTimer()
    S = rt.image_size
    vkey = source_fingerprint(source)
    akey = make_key(video=vkey, center_sigma=center_sigma, xy_sigma=xy_sigma, size=S,
                    detector='aligned' if aligned_input else 'dlib68')
    hits: dict[str, bool] = {}
    frames = None
    aligned = cache.get('align', akey)
    hits['align'] = aligned is not None
    if aligned is None:
        with timer('decode'):
            w, h = source.size
            keep = len(source) * w * h * 3 <= FRAME_RAM_BUDGET
            frames = list(source) if keep else None
        with timer('align'):
            if aligned_input:
                quads, missing = np.repeat(full_frame_quad(w, h)[None], len(source), axis=0), []
            else:
                alignment = align_video(frames if frames is not None else source, detector_factory(), center_sigma,
                                        xy_sigma, progress=rt.progress)
                quads, missing = alignment.quads, alignment.missing
        with timer('crop'):
            it = frames if frames is not None else iter(source)
            size = S if aligned_input else 1024  # aligned frames: one resampling straight to S (exact when already S)
            crops = torch.from_numpy(np.stack([np.asarray(crop_face(f, q, size, S)) for f, q in zip(it, quads)]))
        aligned = {'quads': torch.from_numpy(quads), 'missing': torch.tensor(missing, dtype=torch.long), 'crops': crops}
        cache.put('align', akey, aligned, {'source': str(source.path), 'frames': len(source)})
    missing = aligned['missing'].tolist()
    if missing:
        names = [source.names[i] for i in missing]
        log(f'no face found in {len(missing)} frame(s), quads interpolated from neighbours: {", ".join(names[:20])}'
            + (' ...' if len(names) > 20 else ''))
    ekey = make_key(align=akey, checkpoint=file_stamp(rt.checkpoint), T=rt.T, precision=rt.precision)
    encoded = cache.get('encode', ekey)
    hits['invert'] = encoded is not None
    if encoded is None:
        encoded = encode_crops(rt, crops_to_float(aligned['crops']), timer, cache.partial_dir('encode', ekey), log)
        if cache.put('encode', ekey, encoded, {'source': str(source.path), 'checkpoint': str(rt.checkpoint),
                                               'T': rt.T}) is not None:
            encoded = cache.get('encode', ekey) or encoded  # memory-mapped from now on: RAM goes to the renders
        cache.drop_partial('encode', ekey)
    return EncodedVideo(names=list(source.names), quads=aligned['quads'].numpy(), missing=missing,
                        crops=aligned['crops'], cache_hits=hits, frames=frames, key=ekey, **encoded)


# --------------------------------------------------------------------------------------------------------------------
# Identities and rendering


def finish_identity(edited_unit: Tensor, avg_id: Tensor, mode: EditNorm) -> Tensor:
    """'unit': the released L2-normalised edit. 'source': rescaled to the norm of the averaged identity, so that
    scale 0 gives back exactly the identity the video was inverted with (the reconstruction)."""
    if mode == 'unit':
        return edited_unit
    return edited_unit * avg_id.norm(dim=1, keepdim=True)


def render_identity(rt: Runtime, enc: EncodedVideo, id_feat: Tensor, desc: str = 'render', cache: Cache | None = None,
                    log: Callable[[str], None] = print) -> Tensor:
    """DDIM render of every frame from its x_T with identity id_feat [1,512] and the frame's own landmarks.

    With a `cache` (and `enc.key`), finished batches are saved while rendering, so an interrupted render resumes;
    the caller drops them (`Cache.drop_partial('render', render_key(...))`) once the outputs are written."""
    z = core.z_faces(rt.model, id_feat, enc.lnd_feats, rt.device)
    partial = cache.partial_dir('render', render_key(rt, enc, id_feat)) if cache is not None and enc.key else None
    return resumable_batches(
        partial, enc.x_T.shape, desc, log,
        lambda todo, on_batch: rt.render(enc.x_T[todo], z[todo], desc, on_batch))


def render_key(rt: Runtime, enc: EncodedVideo, id_feat: Tensor) -> str:
    """What a render depends on beyond the inversion: the identity and the decoder."""
    identity = hashlib.sha256(id_feat.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    return make_key(encode=enc.key, identity=identity, decoder=rt.decoder, steps=rt.decoder_steps,
                    spacing=rt.decoder_spacing)


# --------------------------------------------------------------------------------------------------------------------
# Output


@dataclass
class EditResult:
    """One edit to write: its folder, the rendered crops as uint8 [N,S,S,3] (`to_uint8` of the render: a quarter of
    the float memory, which adds up with several edits of a long video) and what describes it."""

    name: str
    out_dir: Path
    render: Tensor
    settings: dict[str, Any]


def edit_dir_ready(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing result silently."""
    if path.exists() and not overwrite:
        raise SystemExit(f'{path} already exists; pass --overwrite to replace it or choose another --out')


def _side_by_side(panels: list[np.ndarray], height: int = 512) -> np.ndarray:
    from PIL import Image

    h = min(height, panels[0].shape[0])
    out = []
    for p in panels:
        w = round(p.shape[1] * h / p.shape[0])
        out.append(np.asarray(Image.fromarray(p).resize((w, h), Image.BILINEAR)) if p.shape[0] != h else p)
    return np.concatenate(out, axis=1)


def write_outputs(
    source,
    enc: EncodedVideo,
    results: list[EditResult],
    out_root: Path,
    fps: float,
    blend: Literal['hard', 'feather'] = 'hard',
    feather: float = 3.0,
    recon: Tensor | None = None,  # uint8 [N,S,S,3] like EditResult.render
    overwrite: bool = False,
    timer: StageTimer | None = None,
    progress: bool = True,
    run_config: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    save_frames: bool = True,
) -> list[Path]:
    """Blend, paste back and write every edit in ONE pass over the frames.

    Per edit folder: frames/<name>.png (full frames), blend/<name>.png (the crop composite, released
    `paste_avg_mani`), out.mp4 at `fps`, side_by_side.mp4 (original | reconstruction if any | edit) and config.json.
    The videos carry the source's sound (cut to the selected frames) when the source is a video file with audio and
    `fps` is its frame rate. Without `save_frames` the full frames are only in the videos (no frames/ folder).
    Each folder is written as `<folder>.partial` and renamed when complete. The aligned crops go to
    `<out_root>/crops/` and, when given, the reconstruction to `<out_root>/recon/`.
    """
    from tqdm.auto import tqdm

    from faces import paste_back
    from video_io import VideoWriter, save_image_atomic

    timer = timer or StageTimer()
    audio = None
    if source.is_video and source.fps:
        if abs(fps - source.fps) > 1e-3:
            log(f'note: the videos are written at {fps:g} fps, not the source rate {source.fps:g}: they carry no sound '
                'from the source')
        else:
            audio = source.audio()  # decoded once for every video written
    feather_sigma = feather if blend == 'feather' else 0.0
    masks = enc.masks[:, 0].numpy()
    crops_u8 = enc.crops.numpy()
    crop_dir = out_root / 'crops'
    crop_dir.mkdir(parents=True, exist_ok=True)
    staged = []
    for r in results:
        edit_dir_ready(r.out_dir, overwrite)
        tmp = r.out_dir.with_name(r.out_dir.name + '.partial')
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / 'blend').mkdir(parents=True)
        if save_frames:
            (tmp / 'frames').mkdir()
        renders = r.render.numpy()
        staged.append((r, tmp, renders, VideoWriter(tmp / 'out.mp4', fps, audio=audio),
                       VideoWriter(tmp / 'side_by_side.mp4', fps, audio=audio)))
    recon_u8 = recon.numpy() if recon is not None else None
    if recon_u8 is not None:
        (out_root / 'recon').mkdir(exist_ok=True)
    frames = iter(enc.frames if enc.frames is not None else source)
    # PNG encoding (zlib releases the GIL) runs in threads beside the pasting and the video encoders
    pool, pending = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)), deque()

    def save(path: Path, image: np.ndarray) -> None:
        pending.append(pool.submit(save_image_atomic, path, image))
        while len(pending) > 32:  # bounded: at most 32 frames wait in memory
            pending.popleft().result()

    try:
        for i in tqdm(range(len(enc)), desc='paste back', unit='frame', disable=not progress):
            name = enc.names[i]
            with timer('decode'):
                frame = next(frames)
            with timer('paste'):
                recon_frame = None if recon_u8 is None else \
                    paste_back(frame, recon_u8[i], enc.quads[i], masks[i], feather_sigma)
                outs = [paste_back(frame, renders[i], enc.quads[i], masks[i], feather_sigma)
                        for _, _, renders, _, _ in staged]
                crop = crops_to_float(enc.crops[i:i + 1])  # per frame: long videos never hold all crops as floats
                blends = [to_uint8(core.blend(crops_to_float(r.render[i:i + 1]), crop, enc.masks[i:i + 1]) * 2 - 1)
                          [0].numpy() for r, *_ in staged]
            with timer('write'):
                save(crop_dir / f'{name}.png', crops_u8[i])
                if recon_frame is not None:
                    save(out_root / 'recon' / f'{name}.png', recon_frame)
                for out, blend_crop, (r, tmp, _, writer, sbs) in zip(outs, blends, staged):
                    if save_frames:
                        save(tmp / 'frames' / f'{name}.png', out)
                    save(tmp / 'blend' / f'{name}.png', blend_crop)
                    writer.write(out)
                    sbs.write(_side_by_side([frame] + ([recon_frame] if recon_frame is not None else []) + [out]))
        with timer('write'):
            while pending:
                pending.popleft().result()
    except BaseException:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        for _, tmp, _, writer, sbs in staged:
            writer.abort()
            sbs.abort()
        raise
    pool.shutdown(wait=True)
    written = []
    for r, tmp, _, writer, sbs in staged:
        with timer('write'):
            writer.close()
            sbs.close()
        write_json(tmp / 'config.json', {**(run_config or {}), **r.settings, 'edit': r.name,
                                         'frames': len(enc), 'fps': fps, 'blend': blend,
                                         'feather': feather_sigma, 'software': software_versions()})
        if r.out_dir.exists():
            shutil.rmtree(r.out_dir)
        os.replace(tmp, r.out_dir)
        written.append(r.out_dir)
    return written


def print_summary(enc: EncodedVideo, timer: StageTimer, outputs: list[Path], out_root: Path,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    summary = {
        'frames': len(enc),
        'faces_missing': [enc.names[i] for i in enc.missing],
        'cache_hits': enc.cache_hits,
        'seconds': {k: round(v, 3) for k, v in timer.seconds.items()},
        'outputs': [str(p) for p in outputs],
    }
    write_json(out_root / 'summary.json', summary)
    log(f'\nframes: {len(enc)}   faces missing (interpolated): {len(enc.missing)}'
        + (f' ({", ".join(summary["faces_missing"][:10])})' if enc.missing else ''))
    log('cache: ' + ', '.join(f'{k} {"hit" if v else "computed"}' for k, v in enc.cache_hits.items()))
    log('time per stage: ' + ', '.join(f'{k} {v:.1f}s' for k, v in timer.seconds.items()))
    for p in outputs:
        log(f'wrote {p}/out.mp4')
    log(f'summary: {out_root / "summary.json"}')
    return summary
