"""DVA editing as a Python API: load once, encode a video into its latents, edit, write.

    from config import EditConfig
    from editing import Editor

    editor = Editor(EditConfig(checkpoint='checkpoints/diffusion_video_autoencoder/last.ckpt', T=100))
    video = editor.encode('sample_video', max_num=50)       # crops, quads, identity, landmarks, masks, x_T
    video.identity, video.landmarks, video.x_T              # z_id of the video, z_lnd and x_T per frame
    mustache = editor.classifier_direction('Mustache')
    edited = editor.edit(video, mustache, 0.3)              # edited crops [N,S,S,3] uint8: edited.crops
    editor.write(video, [edited], 'out/sample_video')       # blend, paste back, frames + out.mp4 + side_by_side.mp4

Every stage streams through the video from disk (`editing.pipeline`), so memory does not grow with its length, and
is cached by content (`editing.cache`): a second edit of the same video costs T network calls per frame, and an
interrupted stage resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

import cli
from config import CELEBA_ATTRIBUTES, EditConfig, to_dict
from editing import core, distributed, pipeline
from editing.cache import DEFAULT_CACHE, Arrays, Cache, file_stamp, hash_files, make_key

FORMAT = 2  # of the cache entries and saved videos; part of every key


class EditError(ValueError):
    """A user error (bad input, missing file, existing result) with a message that names the fix."""


class FrameList:
    """In-memory RGB uint8 frames [H,W,3] as a frame source (what `Editor.encode` makes of an iterable of frames)."""

    is_video, fps, rate, path = False, None, None, None

    def __init__(self, frames: Iterable[np.ndarray]) -> None:
        self.frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
        if not self.frames:
            raise EditError('no frames given')
        shapes = {f.shape for f in self.frames}
        if len(shapes) != 1 or len(self.frames[0].shape) != 3 or self.frames[0].shape[2] != 3:
            raise EditError(f'frames must all be RGB uint8 [H,W,3] of one size, got shapes {sorted(shapes)[:3]}')
        self.names = [f'{i:06d}' for i in range(len(self.frames))]
        self.size = (self.frames[0].shape[1], self.frames[0].shape[0])

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self):
        return iter(self.frames)

    def iter_from(self, first: int):
        return iter(self.frames[first:])

    def audio(self) -> None:
        return None


@dataclass
class Direction:
    """An edit of the video identity: apply(identity [1,512], scale) -> edited identity [1,512] of unit norm."""

    name: str
    apply: Callable[[Tensor, float], Tensor]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedVideo:
    """A video in DVA's latents, on disk (arrays are read when asked for: a long video never sits in RAM).

    names: one name per frame; missing: indices of frames where no face was found (their quads are interpolated;
    they do not count in the identity and stay unedited unless faceless='edit'); source: how to decode the frames
    again (a path and a selection, or the in-memory frames); arrays: 'quads', 'crops' (align) and 'id_feats',
    'lnd_feats', 'masks', 'x_T' (encode).
    """

    names: list[str]
    missing: list[int]
    source: Any
    align_arrays: Arrays
    arrays: Arrays
    key: str
    cache_hits: dict[str, bool] = field(default_factory=dict)
    content: str = ''  # `fingerprint` of the source frames

    def __len__(self) -> int:
        return len(self.names)

    @property
    def quads(self) -> np.ndarray:
        """[N,4,2] float64 face quads (TL, BL, BR, TR) in frame pixels."""
        return self.align_arrays.read('quads')

    @property
    def crops(self) -> np.ndarray:
        """[N,S,S,3] uint8 aligned crops."""
        return self.align_arrays.read('crops')

    @property
    def id_feats(self) -> Tensor:
        """[N,512] per-frame identity features (ArcFace, L2-normalised)."""
        return torch.from_numpy(self.arrays.read('id_feats'))

    @property
    def identity(self) -> Tensor:
        """[1,512] the video's identity: the mean of the frames' features where a face was found (not re-normalised,
        as released)."""
        return core.average_identity(self.id_feats[pipeline.faces_shown(len(self), np.asarray(self.missing))])

    @property
    def landmarks(self) -> Tensor:
        """[N,2K] per-frame landmark features (the motion code)."""
        return torch.from_numpy(self.arrays.read('lnd_feats'))

    @property
    def masks(self) -> Tensor:
        """[N,1,S,S] binary face masks (video background classes)."""
        return torch.from_numpy(self.arrays.read('masks')).float()

    @property
    def x_T(self) -> Tensor:
        """[N,3,S,S] DDIM inversions (conditioned on the video identity with each frame's landmarks)."""
        return torch.from_numpy(self.arrays.read('x_T'))

    def save(self, path: str | os.PathLike) -> Path:
        """Copy the latents into one folder (arrays as .npy, video.json); `EncodedVideo.load` reads it back."""
        path = Path(path)
        if path.exists():
            raise EditError(f'{path} exists: choose a new folder to save the encoded video in')
        tmp = path.with_name(path.name + '.partial')
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for arrays in (self.align_arrays, self.arrays):
            for f in arrays.folder.glob('*.npy'):
                if not f.name.endswith('.done.npy'):
                    shutil.copyfile(f, tmp / f.name)
        source = self.source if isinstance(self.source, dict) else None
        cli.write_json(tmp / 'video.json', {'format': FORMAT, 'names': self.names, 'missing': self.missing,
                                            'source': source, 'key': self.key, 'content': self.content})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EncodedVideo:
        path = Path(path)
        try:
            meta = json.loads((path / 'video.json').read_text())
        except (OSError, ValueError) as e:
            raise EditError(f'{path} is not a saved encoded video (no readable video.json): {e}') from None
        if meta.get('format') != FORMAT:
            raise EditError(f'{path} was saved in format {meta.get("format")}, this version reads {FORMAT}: encode again')
        arrays = Arrays(path)
        return cls(meta['names'], meta['missing'], meta['source'], arrays, arrays, meta['key'], {}, meta['content'])

    def frames(self):
        """The source frames again (decoded anew), as RGB uint8 [H,W,3]."""
        return open_source(self.source)


class AlignedVideo(NamedTuple):
    """What `Editor.align` returns: the source spec and frame source, the cache arrays 'quads' [N,4,2] and 'crops'
    [N,S,S,3], the cache key, whether it was a cache hit, the content fingerprint, the faceless frame indices."""

    spec: Any
    source: Any
    arrays: Arrays
    key: str
    hit: bool
    content: str
    missing: list[int]


@dataclass
class Rendered:
    """The crops rendered with one identity: 'render' [N,S,S,3] uint8 in `arrays` (on disk)."""

    name: str
    identity: Tensor
    arrays: Arrays
    settings: dict[str, Any] = field(default_factory=dict)
    key: str = ''

    @property
    def crops(self) -> np.ndarray:
        """[N,S,S,3] uint8 rendered crops."""
        return self.arrays.read('render')

    @property
    def x0(self) -> Tensor:
        """[N,3,S,S] the renders in [-1,1] before rounding (only for renders made with keep_float)."""
        if 'render_float' not in self.arrays:
            raise EditError(f'{self.name} was rendered without keep_float: only its 8-bit crops are stored')
        return torch.from_numpy(self.arrays.read('render_float'))


def open_source(source: Any):
    """A frame source from a path spec {'path', 'start', 'end', 'max_num'} or in-memory frames."""
    if not isinstance(source, dict):
        return source
    from video_io import FrameSource

    try:
        return FrameSource(source['path'], start=source['start'], end=source['end'], max_num=source['max_num'])
    except (FileNotFoundError, ValueError) as e:
        raise EditError(f'cannot read --video_path {source["path"]}: {e}') from None


def fingerprint(source) -> str:
    """The identity of a source's content: names and bytes of its files, or of its in-memory frames."""
    if isinstance(source, FrameList):
        h = hashlib.sha256()
        for f in source.frames:
            h.update(f.tobytes())
        return make_key(frames=h.hexdigest(), names=source.names)
    files = [source.path] if source.is_video else source.files
    return make_key(content=hash_files(files), names=list(source.names))


def load_model(cfg: EditConfig):
    """(checkpoint path, EMA autoencoder in eval mode on CPU, DVAConfig, checkpoint metadata such as global_step)
    for cfg.checkpoint / cfg.template."""
    import templates
    from model.pretrained import WeightsError, load_dva

    ckpt = resolve_checkpoint(cfg.checkpoint)
    try:
        model, dva_cfg, meta = load_dva(ckpt, templates.get_preset(cfg.template), which='ema',
                                        trust=cfg.trust_checkpoint)
    except WeightsError as e:
        raise EditError(f'{ckpt} does not fit --template {cfg.template} (a checkpoint without a stored config is '
                        f'built from --template): pass the preset it was trained with, one of '
                        f'{", ".join(sorted(templates.PRESETS))}'
                        if 'key' in str(e).lower() else str(e)) from None
    check_T(cfg.T, dva_cfg.diffusion.num_timesteps)
    return ckpt, model, dva_cfg, meta


def resolve_checkpoint(path: str | None) -> Path:
    from model.pretrained import DVA_CKPT

    if path:
        return Path(path)
    default = Path(DVA_CKPT)
    last = default.with_name('last.ckpt')
    return last if not default.is_file() and last.is_file() else default


def check_T(T: int, num_timesteps: int = 1000) -> int:
    """Validate T against the diffusion length (EditError naming the nearest valid values)."""
    from diffusion import space_timesteps

    try:
        space_timesteps(num_timesteps, T)
    except ValueError as e:
        raise EditError(f'--T: {e}') from None
    return T


class Editor:
    """The EMA model, its encoders, device, precision and sampler, loaded once; encode, edit, render, write.

    Settings come from an `EditConfig` (the editors' flags); `model` may be given (already loaded) instead of
    cfg.checkpoint; `ranks` (default: from torchrun's environment) shares the frames of each stage between processes.
    Progress is shown as one tqdm bar per stage (Gradio's `track_tqdm` shows the same bars in the demo)."""

    def __init__(self, cfg: EditConfig, model: torch.nn.Module | None = None, checkpoint: str | None = None,
                 ranks: distributed.Ranks | None = None) -> None:
        from editing.speed import auto_batch_size, micro_batch_size, optimize_for_inference

        self.cfg = cfg
        check_T(cfg.T)
        self.ranks = ranks if ranks is not None else distributed.from_env(cfg.device)
        self.device = cli.resolve_device(distributed.rank_device(cfg.device, self.ranks))
        if model is None:
            ckpt, model, _, _ = load_model(cfg)
        else:
            ckpt = Path(checkpoint or cfg.checkpoint or 'in-memory')
        self.checkpoint = ckpt
        cli.set_cpu_threads()
        model = model.to(self.device, core.dtype_of(cfg.precision)).eval()
        S = model.cfg.unet.image_size
        self.batch_size = (auto_batch_size(model, S, self.device, cfg.precision) if cfg.batch_size == 'auto'
                           else cfg.batch_size)
        self.model = optimize_for_inference(model, self.device, channels_last=cfg.channels_last, compile=cfg.compile)
        self.sampler = core.Sampler(self.model, cfg.T, cfg.precision, micro_batch_size(self.device, S),
                                    cfg.decoder, cfg.decoder_steps, cfg.decoder_spacing)
        self.cache = self._open_cache(cfg)
        self.timer = pipeline.StageTimer()
        self.stage: tuple[str, Arrays, str, int] | None = None  # what is running: for "N of M frames done"
        self._classifiers: dict[str, Any] = {}  # loaded once, shared with with_settings' Editors

    MODEL_FIELDS = ('checkpoint', 'template', 'trust_checkpoint', 'device', 'precision', 'channels_last', 'compile')

    def with_settings(self, **changes: Any) -> Editor:
        """A new Editor sharing this one's loaded (and optimised or compiled) model, with other settings: T, decoder,
        blend, cache_dir, the video selection, ... (the demo makes one per request). The fields of MODEL_FIELDS, which
        the loaded model depends on, cannot change."""
        fixed = sorted(k for k in changes if k in self.MODEL_FIELDS and changes[k] != getattr(self.cfg, k))
        if fixed:
            raise EditError(f'with_settings cannot change {", ".join(fixed)}: load another Editor for that')
        new = copy.copy(self)
        new.cfg = replace(self.cfg, **changes)
        check_T(new.cfg.T)
        if new.cfg.batch_size != self.cfg.batch_size and new.cfg.batch_size != 'auto':
            new.batch_size = new.cfg.batch_size
        new.sampler = core.Sampler(self.model, new.cfg.T, new.cfg.precision, self.sampler.micro_batch,
                                   new.cfg.decoder, new.cfg.decoder_steps, new.cfg.decoder_spacing)
        new.cache = self._open_cache(new.cfg)
        new.timer, new.stage = pipeline.StageTimer(), None
        return new

    def _open_cache(self, cfg: EditConfig) -> Cache:
        cache = Cache(None if cfg.no_cache else (cfg.cache_dir or DEFAULT_CACHE), self.ranks.rank)
        if self.ranks.enabled and not cache.enabled:  # the ranks share one scratch folder
            cache._scratch = Path(self.ranks.broadcast(str(cache.folder) if self.ranks.main else None))
        return cache

    @property
    def image_size(self) -> int:
        return self.model.cfg.unet.image_size if hasattr(self.model, 'cfg') else self.model._orig_mod.cfg.unet.image_size

    @property
    def progress(self) -> bool:
        return not self.cfg.quiet

    def log(self, text: str) -> None:
        print(text)

    def _run(self, what: str, arrays: Arrays, stage: str, n: int, timed: bool = True):
        """Note the running stage (for "N of M frames done"); time it unless the pipeline times its own parts."""
        self.stage = (what, arrays, stage, n)
        return self.timer(what) if timed else contextlib.nullcontext()

    def _fill(self, kind: str, key: str, stage: tuple[str, str, int], compute: Callable[[Arrays], None],
              meta: dict[str, Any], timed: bool = False) -> tuple[Any, bool]:
        """(the complete cache entry kind/key, whether it was there already). Else `compute(arrays)` fills it, every
        rank its share, while rank 0 holds it against other runs (`Cache.filling`): a second run on the same video
        waits, then takes the first one's result. stage: (what, array, frames) for "N of M frames done"."""

        def complete() -> bool:  # rank 0's view, so that every rank takes the same branch
            return self.ranks.broadcast(self.cache.entry(kind, key).complete if self.ranks.main else None,
                                        'checking the cache')

        if complete():
            return self.cache.entry(kind, key), True
        with self.cache.filling(kind, key, self.log) if self.ranks.main else contextlib.nullcontext():
            if complete():  # another run filled it while this one waited
                return self.cache.entry(kind, key), True
            entry = self.cache.entry(kind, key)
            with self._run(stage[0], entry.arrays, stage[1], stage[2], timed=timed):
                compute(entry.arrays)
            if self.ranks.main:
                entry.commit(meta)
            self.ranks.barrier('storing a result')
        return self.cache.entry(kind, key), False

    def done_frames(self) -> tuple[str, int, int] | None:
        """(stage, frames done, frames) of the stage that is running or ran last."""
        if self.stage is None:
            return None
        what, arrays, stage, n = self.stage
        try:
            return what, int(arrays.done(stage, n).sum()), n
        except (OSError, ValueError):
            return what, 0, n

    # ----------------------------------------------------------------------------------------------------------------
    # encode

    def open(self, video: str | os.PathLike | Iterable[np.ndarray] | None = None, start: int | None = None,
             end: int | None = None, max_num: int | None = None):
        """(source spec, frame source) of a path (frame folder or video file) or of in-memory RGB frames."""
        video = self.cfg.video_path if video is None else video
        if isinstance(video, (str, os.PathLike)):
            spec = {'path': str(video), 'start': self.cfg.start if start is None else start,
                    'end': self.cfg.end if end is None else end,
                    'max_num': self.cfg.max_num if max_num is None else max_num}
            return spec, open_source(spec)
        source = FrameList(video)
        return source, source

    def align(self, video: str | os.PathLike | Iterable[np.ndarray] | None = None, *, start: int | None = None,
              end: int | None = None, max_num: int | None = None, aligned: bool | None = None) -> AlignedVideo:
        """The first stage of `encode`: detect, smooth and crop the face of every frame of `video` (default
        cfg.video_path), or reuse the cache. The demo's preview calls it, so that its edit finds the alignment done."""
        from faces import DlibDetector, NoFaceError, full_frame_quad

        spec, source = self.open(video, start, end, max_num)
        aligned = self.cfg.aligned if aligned is None else aligned
        if aligned:
            try:
                full_frame_quad(*source.size)
            except ValueError as e:
                raise EditError(f'{getattr(source, "path", "frames")}: {e}') from None
        cfg, S = self.cfg, self.image_size
        detector = 'aligned' if aligned else f'dlib68-up{cfg.max_upsample}-side{cfg.detect_side}'
        content = fingerprint(source)
        akey = make_key(format=FORMAT, video=content, center_sigma=cfg.center_sigma,
                        xy_sigma=cfg.xy_sigma, size=S, detector=detector)
        factory = None if aligned else lambda: DlibDetector(pretrained_dir=cfg.pretrained_dir,
                                                            max_upsample=cfg.max_upsample,
                                                            max_detect_side=cfg.detect_side or None)

        def compute(arrays: Arrays) -> None:
            try:
                pipeline.align(source, factory, arrays, S, cfg.center_sigma, cfg.xy_sigma, self.progress, self.log,
                               self.ranks, self.timer)
            except NoFaceError as e:
                raise EditError(f'{getattr(source, "path", "frames")}: {e}. Is there a frontal face in the video?'
                                ) from None
            except ValueError as e:  # a frame that fails to decode part-way (the header check passed)
                raise EditError(f'cannot read {getattr(source, "path", "frames")}: {e}') from None

        a, hit = self._fill('align', akey, ('align', 'crops', len(source)), compute,
                            {'source': str(getattr(source, 'path', 'frames')), 'frames': len(source)})
        return AlignedVideo(spec, source, a.arrays, akey, hit, content, a.arrays.read('missing').tolist())

    def encode(self, video: str | os.PathLike | Iterable[np.ndarray] | None = None, *, start: int | None = None,
               end: int | None = None, max_num: int | None = None, aligned: bool | None = None) -> EncodedVideo:
        """Align, crop, encode and DDIM-invert every frame of `video` (default cfg.video_path), or reuse the cache."""
        cfg = self.cfg
        spec, source, arrays, akey, hit, content, missing = self.align(video, start=start, end=end, max_num=max_num,
                                                                       aligned=aligned)
        hits = {'align': hit}
        if missing and self.ranks.main:
            names = [source.names[i] for i in missing]
            self.log(f'no face found in {len(missing)} frame(s): '
                     + ('left unedited, ' if cfg.faceless == 'keep' else 'edited at interpolated quads, ')
                     + 'not counted in the identity: ' + ', '.join(names[:20]) + (' ...' if len(names) > 20 else ''))
        ekey = make_key(align=akey, checkpoint=file_stamp(self.checkpoint) if self.checkpoint.is_file() else
                        str(self.checkpoint), T=cfg.T, precision=cfg.precision)
        e, hits['invert'] = self._fill(
            'encode', ekey, ('invert', 'x_T', len(source)),
            lambda out: pipeline.encode(self.sampler, arrays, out, np.asarray(missing), self.batch_size, self.progress,
                                        self.log, self.ranks, self.timer),
            {'source': str(getattr(source, 'path', 'frames')), 'checkpoint': str(self.checkpoint), 'T': cfg.T})
        return EncodedVideo(list(source.names), missing, spec, arrays, e.arrays, ekey, hits, content)

    # ----------------------------------------------------------------------------------------------------------------
    # directions

    def classifier_direction(self, attribute: str, cls_checkpoint: str | None = None,
                             normalize: bool | None = None) -> Direction:
        """The released classifier edit along a CelebA attribute (in z-normalised identity space with `normalize`)."""
        from model.pretrained import WeightsError, load_classifier

        if attribute not in CELEBA_ATTRIBUTES:
            raise EditError(f'unknown attribute {attribute!r}; choose from: {", ".join(CELEBA_ATTRIBUTES)}')
        path = cls_checkpoint or self.cfg.cls_checkpoint
        normalize = self.cfg.normalize if normalize is None else normalize
        if path not in self._classifiers:
            try:
                clf = load_classifier(path, trust=self.cfg.trust_checkpoint)[0]
                self._classifiers[path] = clf.to(core.dtype_of(self.cfg.precision))  # fp64: the edit in float64 too
            except WeightsError as e:
                raise EditError(str(e)) from None
        clf, idx = self._classifiers[path], CELEBA_ATTRIBUTES.index(attribute)
        move = clf.edit_identity if normalize else clf.edit_identity_raw

        def apply(identity: Tensor, scale: float) -> Tensor:
            return move(identity.to(clf.classifier.weight), idx, scale).to(identity)

        return Direction(attribute, apply, {'attribute': attribute, 'cls_checkpoint': str(path),
                                            'normalize': normalize})

    def clip_direction(self, video: EncodedVideo, out_dir: str | os.PathLike | None = None,
                       cfg: EditConfig | None = None) -> Direction:
        """A CLIP text direction (cfg.src_txt -> cfg.trg_txt): loaded from cfg.direction, or from
        <out_dir>/directions/ when found there with the same settings, else searched on frame cfg.clip_frame (the
        released objective) and saved there."""
        from editing import clip_search

        return clip_search.direction(self, video, cfg or self.cfg, Path(out_dir) if out_dir else None)

    # ----------------------------------------------------------------------------------------------------------------
    # render

    def identity(self, video: EncodedVideo, direction: Direction, scale: float) -> Tensor:
        """The video identity moved along `direction` by `scale`, with cfg.edit_norm ('source': the norm of the
        video identity, so scale 0 is the reconstruction; 'unit': as released)."""
        return core.finish_identity(direction.apply(video.identity, scale), video.identity, self.cfg.edit_norm)

    def render(self, video: EncodedVideo, identity: Tensor, name: str = 'render',
               settings: dict[str, Any] | None = None, keep_float: bool | None = None) -> Rendered:
        """Every frame rendered from its x_T with `identity` [1,512] and its own landmarks (on disk, resumable, and
        cached: the same identity is rendered once)."""
        keep_float = self.cfg.precision == 'fp64' if keep_float is None else keep_float
        digest = hashlib.sha256(identity.detach().double().cpu().contiguous().numpy().tobytes()).hexdigest()
        key = make_key(encode=video.key, identity=digest, decoder=self.cfg.decoder, steps=self.cfg.decoder_steps,
                       spacing=self.cfg.decoder_spacing, keep_float=keep_float)
        entry, _ = self._fill(
            'render', key, ('render', 'render', len(video)),
            lambda out: pipeline.render(self.sampler, video.arrays, identity, out, self.batch_size, f'render {name}',
                                        self.progress, self.log, keep_float, self.ranks),
            {'name': name, 'encode': video.key}, timed=True)
        return Rendered(name, identity, entry.arrays, dict(settings or {}), key)

    def edit(self, video: EncodedVideo, direction: Direction, scale: float, name: str | None = None) -> Rendered:
        """Render the video with its identity moved along `direction` by `scale`."""
        name = name or f'{direction.name}_{scale_name(scale)}'
        return self.render(video, self.identity(video, direction, scale), name,
                           {**direction.settings, 'scale': scale})

    def reconstruct(self, video: EncodedVideo) -> Rendered:
        """Render the video with its own identity (the unedited reconstruction)."""
        return self.render(video, video.identity, 'reconstruction')

    # ----------------------------------------------------------------------------------------------------------------
    # write

    def write(self, video: EncodedVideo, edits: list[Rendered], out_root: str | os.PathLike,
              recon: Rendered | None = None, run_config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Blend, paste back and write every edit into <out_root>/<edit name>/ (frames, blends, out.mp4,
        side_by_side.mp4, config.json), the crops into <out_root>/crops/ and summary.json; returns the summary.

        A result folder is written as <name>.partial and renamed when complete; an existing one is replaced only
        with cfg.overwrite. One out_root holds one video (video.json): another video there is refused."""
        cfg, out_root = self.cfg, Path(out_root)
        self.check_outputs(out_root, [r.name for r in edits], video)
        source = video.frames()
        fps = cfg.fps or (source.fps if source.is_video and source.fps else 20.0)
        audio = None
        if source.is_video and source.fps:
            if abs(fps - source.fps) > 1e-3:
                self.log(f'note: the videos are written at {fps:g} fps, not the source rate {source.fps:g}: they carry '
                         'no sound from the source')
            else:
                audio = source.audio()  # decoded once for every video written
        main = self.ranks.main
        created = not out_root.exists()
        self.ranks.barrier('checking the output folder')
        staged = [(out_root / f'{r.name}.partial', r.arrays) for r in edits]
        if main:
            out_root.mkdir(parents=True, exist_ok=True)
            cli.write_json(out_root / 'video.json', {'source': _describe(video.source), 'key': video.key})
            for folder, _ in staged:
                shutil.rmtree(folder, ignore_errors=True)
        keep = pipeline.faces_shown(len(video), np.asarray(video.missing))
        edit_frames = keep if cfg.faceless == 'keep' else np.ones(len(video), bool)
        try:
            with self._run('write', edits[0].arrays if edits else video.arrays, 'render', len(video), timed=False):
                pipeline.write(source, video.names, video.align_arrays, video.arrays, staged, out_root, fps, audio,
                               cfg.blend, cfg.feather, recon.arrays if recon else None, edit_frames,
                               cfg.save_frames, self.timer, self.progress, self.ranks)
        except BaseException:
            if main:
                for folder, _ in staged:
                    shutil.rmtree(folder, ignore_errors=True)
                if created and not any(p for p in out_root.iterdir() if p.name not in ('crops', 'video.json', 'recon')):
                    shutil.rmtree(out_root, ignore_errors=True)  # leave no empty result folder behind
            raise
        summary = None
        if main:
            outputs = []
            software = cli.software_versions()
            for r, (folder, _) in zip(edits, staged):
                cli.write_json(folder / 'config.json', {
                    **(run_config or {}), 'config': to_dict(cfg), **r.settings, 'edit': r.name, 'frames': len(video),
                    'fps': fps, 'blend': cfg.blend, 'feather': cfg.feather if cfg.blend == 'feather' else 0.0,
                    'checkpoint': str(self.checkpoint), 'device': str(self.device), 'batch_size': self.batch_size,
                    'ranks': self.ranks.world, 'software': software})
                outputs.append(pipeline.publish(folder, out_root / r.name))
            decode = source.decode_report() if hasattr(source, 'decode_report') else None
            summary = pipeline.summary_of(video.names, video.missing, video.cache_hits, self.timer, outputs,
                                          {'faceless': cfg.faceless, 'ranks': self.ranks.world, 'decode': decode})
            cli.write_json(out_root / 'summary.json', summary)
        return self.ranks.broadcast(summary, 'writing the summary')

    def check_outputs(self, out_root: str | os.PathLike, names: list[str], video: EncodedVideo | None = None) -> None:
        """Refuse, before any work, to replace an existing result silently or to mix two videos in one folder
        (`check_one_video`)."""
        out_root = Path(out_root)
        if len(set(names)) != len(names):
            raise EditError(f'two edits would be written to the same folder: {sorted(names)}')
        if not self.cfg.overwrite:
            for name in names:
                if (out_root / name).exists():
                    raise EditError(f'{out_root / name} already exists; pass --overwrite to replace it or choose '
                                    'another --out')
        if video is not None:
            check_one_video(out_root, _describe(video.source))

    def close(self) -> None:
        if self.ranks.main:
            self.cache.close()


def check_one_video(out_root: str | os.PathLike, source: dict[str, Any] | None) -> None:
    """EditError when `out_root` holds the results of another video or frame selection than `source` (its
    video.json), even with --overwrite: one output folder holds one video."""
    try:
        other = json.loads((Path(out_root) / 'video.json').read_text()).get('source')
    except (OSError, ValueError, AttributeError):  # no results yet (or a name too long for the file system)
        return
    if isinstance(other, dict) and _real(other) != _real(source):
        raise EditError(f'--out {out_root} holds the results of another video or frame selection '
                        f'({_selection(other)}; this run: {_selection(source or {})}): use one --out folder per video')


def _real(source: dict[str, Any] | None) -> dict[str, Any] | None:
    """The source with an existing path made canonical: a relative and an absolute path (or a symlink) of one video
    are the same video."""
    path = (source or {}).get('path')
    return {**source, 'path': os.path.realpath(path)} if isinstance(path, str) and os.path.exists(path) else source


def _selection(source: dict) -> str:
    extra = ', '.join(f'{k} {source.get(k)}' for k in ('start', 'end', 'max_num') if source.get(k) not in (None, 0))
    return f'{source.get("path")}' + (f' with {extra}' if extra else '')


def _describe(source: Any) -> dict[str, Any] | None:
    return {k: source[k] for k in ('path', 'start', 'end', 'max_num')} if isinstance(source, dict) else None


def scale_name(scale: float) -> str:
    """'0.30' for 0.3 (two decimals, as released), more digits when two would merge distinct scales (0.301)."""
    text = f'{scale:.2f}'
    return text if float(text) == scale else repr(float(scale))


__all__ = ['Editor', 'EditConfig', 'EncodedVideo', 'AlignedVideo', 'Direction', 'Rendered', 'EditError', 'replace']
