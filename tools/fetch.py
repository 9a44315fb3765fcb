"""Fetch the released DVA files (checkpoints, frozen nets, CelebA-HQ data, CLIP, sample frames) into a project root.

Run through `download_requirements.sh` (a thin wrapper) or directly: `python3 tools/fetch.py [--only NAME] ...`.

Behaviour:
- Idempotent. A file is complete when its size and, where known, sha256 match; what was fetched is recorded in
  `<root>/.dva_downloads.json` (size, mtime, sha256, source), so complete files are skipped without re-hashing and
  zips are not unzipped again while their members are in place.
- Resumable. Downloads go to `<file>.part` and continue with an HTTP Range request; Google Drive files go through
  gdown, which resumes its own partial file. A file gets its final name only once it is complete and verified.
- One line per file on stdout: `skipped|downloaded|resumed|unpacked|pending|FAILED <path> (<detail>)`.
  The exit status is 1 when any source failed (stderr then lists each failed file with its source), 2 on bad usage.

Sources can be redirected through the environment (the tests point every source at a local HTTP server):
- `DVA_ROOT`              project root (default: the folder above tools/); `--root` wins.
- `DVA_MIRROR`            base URL laid out like the project root: `<mirror>/<path>` for each file, where <path> is
                          the destination path, or the archive for zips (`pretrained_models.zip`) and for the dlib
                          predictor (`pretrained_models/shape_predictor_68_face_landmarks.dat.bz2`).
- `DVA_GDRIVE_URL`        a URL template with `{id}`: Drive files are fetched from it by plain HTTP instead of gdown.
- `DVA_GDRIVE_<NAME>`     the Google Drive id of entry NAME (e.g. DVA_GDRIVE_DVA_CKPT).
- `DVA_URL_<NAME>`        the URL of entry NAME (for sample_video: the folder URL the frame names are appended to).
- `DVA_SHA256_<NAME>`     the expected sha256 of entry NAME's final file ('' disables the check); overriding it also
                          drops the built-in size.
Precedence: DVA_URL_<NAME>, then DVA_GDRIVE_URL (Drive entries), then DVA_MIRROR, then the table below.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, TextIO

# ======================================================================================================================
# SOURCES: the one table of what is fetched. `name` is the --only key and the <NAME> of the environment overrides.
#
# Google Drive ids: the spec (dva_spec.md section 7) gives only their prefixes (1J_eAs5-, 1Q6z7Wmo9, 1nddbwuAvIVE,
# 1X2u83hSO2, 1Kk7U6aeu); the full ids below are the ones in the released repo's download_requirements.sh
# (gmkim-ai/Diffusion-Video-Autoencoders), and each begins with its spec prefix. Override one with DVA_GDRIVE_<NAME>.
# sha256: none is published for the Drive files; the CLIP one is the hash embedded in OpenAI's URL; the dlib one is that
# of the copy of dlib.net's file redistributed in the face-recognition-models 0.3.0 wheel (99,693,937 bytes), which our
# code falls back to when pretrained_models/ lacks the predictor.
# The sample frames are pinned to the released repo's commit that added them, as raw.githubusercontent.com URLs.
# ======================================================================================================================
SAMPLE_VIDEO_COMMIT = 'f0c13f0de9a239bf735c24bc2174e60d0a88fa19'
SAMPLE_VIDEO_FRAMES = tuple(f'{i:04d}.jpeg' for i in range(100))

Kind = Literal['file', 'zip', 'bz2', 'files']


@dataclass(frozen=True)
class Source:
    """One released item.

    kind: 'file' (dest is the file), 'zip' (downloads `<dest>.zip` and unpacks it into the folder dest), 'bz2'
    (downloads `<dest>.bz2` and decompresses it to the file dest), 'files' (dest is a folder; `members` are the file
    names, each fetched from `<url>/<member>`).
    members: for 'zip', paths under dest that must exist after unpacking; for 'files', the file names.
    keep_existing: an existing dest is kept even when it does not match the sha256 (it may come from another entry).
    """

    name: str
    dest: str
    kind: Kind
    gdrive_id: str | None = None
    url: str = ''
    sha256: str = ''
    size: int | None = None
    members: tuple[str, ...] = ()
    keep_existing: bool = False
    about: str = ''


SOURCES: tuple[Source, ...] = (
    Source(
        'dva_ckpt',
        'checkpoints/diffusion_video_autoencoder/epoch=51-step=1000000.ckpt',
        'file',
        gdrive_id='1Q6z7Wmo9xve5SgfDJExohpDSSNi4QxcH',
        about='DVA checkpoint used by editing',
    ),
    Source(
        'latent',
        'checkpoints/diffusion_video_autoencoder/latent.pkl',
        'file',
        gdrive_id='1J_eAs5-KWn--kmcqx5S-QjVPskTczTMU',
        about='identity feature statistics (classifier editing)',
    ),
    Source(
        'cls_ckpt',
        'checkpoints/diffusion_video_autoencoder_cls/last.ckpt',
        'file',
        gdrive_id='1nddbwuAvIVEqKkkmUF96nJj91jVmAdtR',
        about='attribute classifier',
    ),
    Source(
        'pretrained_models',
        'pretrained_models',
        'zip',
        gdrive_id='1X2u83hSO2jObO6pCCpZXa45qpQU2ECKJ',
        members=('model_ir_se50.pth', 'mobilenet_224_model_best_gdconv_external.pth.tar', '79999_iter.pth'),
        about='frozen IR-SE50, MobileNet-GDConv landmarks, BiSeNet parsing',
    ),
    Source(
        'dlib_predictor',
        'pretrained_models/shape_predictor_68_face_landmarks.dat',
        'bz2',
        url='https://dlib.net/files/shape_predictor_68_face_landmarks.dat.bz2',
        sha256='fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f',
        size=99_693_937,
        keep_existing=True,
        about='dlib 68-landmark predictor (skipped when pretrained_models.zip provides it)',
    ),
    Source(
        'clip_vit_b16',
        'pretrained_models/ViT-B-16.pt',
        'file',
        url='https://openaipublic.azureedge.net/clip/models/'
        '5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt',
        sha256='5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f',
        about='OpenAI CLIP ViT-B/16 (CLIP editing)',
    ),
    Source(
        'alexnet_lpips',
        'pretrained_models/alexnet-owt-7be5be79.pth',
        'file',
        url='https://download.pytorch.org/models/alexnet-owt-7be5be79.pth',
        about='torchvision AlexNet ImageNet weights (LPIPS backbone for run_metrics.py; the file name holds the '
        'first 8 hex digits of its sha256)',
    ),
    Source(
        'datasets',
        'datasets',
        'zip',
        gdrive_id='1Kk7U6aeuQCY2-lhOOXxzTbxa5AYidsK2',
        members=('celebahq256.lmdb', 'celeba_anno/CelebAMask-HQ-attribute-anno.txt'),
        about='CelebA-HQ 256 LMDB and attributes (classifier training only)',
    ),
    Source(
        'sample_video',
        'sample_video',
        'files',
        url='https://raw.githubusercontent.com/gmkim-ai/Diffusion-Video-Autoencoders/'
        f'{SAMPLE_VIDEO_COMMIT}/sample_video',
        members=SAMPLE_VIDEO_FRAMES,
        about='100 sample frames (1920x1080 JPEG)',
    ),
)
# ======================================================================================================================

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = '.dva_downloads.json'
USER_AGENT = 'dva-fetch/1.0 (+python-urllib)'
CHUNK = 1 << 20
JUNK = ('__MACOSX', '.DS_Store')

# Indirection points for tests: every HTTP request goes through _urlopen, every Drive download through gdown_download.
_urlopen = urllib.request.urlopen


class FetchError(Exception):
    """A source failed; the message says why (the caller adds the file and the source)."""


def gdown_download(file_id: str, output: Path, quiet: bool) -> None:
    """Download Google Drive file `file_id` to `output` with gdown (resuming its own `<output>XXXXXXXX.part`)."""
    try:
        import gdown
    except ImportError as e:
        raise FetchError('gdown is not installed (pip install -r requirements.txt)') from e
    try:
        gdown.download(id=file_id, output=str(output), quiet=quiet, resume=True)
    except Exception as e:  # gdown raises several types (quota, permission, network); report them all the same way
        msg = ' '.join(str(e).split())  # gdown's messages span several lines (the reason is often not the first)
        raise FetchError(f'{type(e).__name__}: {msg[:400]}') from e
    if not output.is_file():
        raise FetchError('gdown returned without writing the file')


# ---------------------------------------------------------------------------------------------------------------------
# Plan: resolve the table and the environment into tasks.


@dataclass
class Task:
    """One thing to fetch: a file (kind 'file', or one frame of a 'files' entry), a zip or a bz2 file."""

    source: Source
    rel: str  # destination, relative to the root (a folder for zips)
    fetch_rel: str  # what is downloaded, relative to the root (the archive for zips and bz2)
    origin: str  # 'gdrive:<id>' or a URL
    sha256: str
    size: int | None
    error: str = ''  # set when the source cannot even be resolved (e.g. an unknown Drive id)


def _env_key(name: str) -> str:
    return re.sub(r'[^A-Z0-9]', '_', name.upper())


def _join(base: str, rel: str) -> str:
    return base.rstrip('/') + '/' + urllib.parse.quote(rel)


def plan(sources: tuple[Source, ...], env: Mapping[str, str]) -> list[Task]:
    """Turn sources into tasks, applying the environment overrides described in the module docstring."""
    mirror = env.get('DVA_MIRROR', '')
    gdrive_url = env.get('DVA_GDRIVE_URL', '')
    tasks = []
    for src in sources:
        key = _env_key(src.name)
        sha, size = src.sha256, src.size
        if f'DVA_SHA256_{key}' in env:
            sha, size = env[f'DVA_SHA256_{key}'].strip().lower(), None
        url_override = env.get(f'DVA_URL_{key}', '')
        if src.kind == 'files':
            for member in src.members:
                rel = f'{src.dest}/{member}'
                base = url_override or (mirror and _join(mirror, src.dest)) or src.url
                tasks.append(Task(src, rel, rel, _join(base, member), '', None))
            continue
        fetch_rel = {'zip': f'{src.dest}.zip', 'bz2': f'{src.dest}.bz2'}.get(src.kind, src.dest)
        task = Task(src, src.dest, fetch_rel, '', sha, size)
        if url_override:
            task.origin = url_override
        elif src.gdrive_id is not None:
            file_id = env.get(f'DVA_GDRIVE_{key}', src.gdrive_id).strip()
            if not file_id:
                task.error = f'its Google Drive id is unknown: set DVA_GDRIVE_{key}'
            elif gdrive_url:
                task.origin = gdrive_url.replace('{id}', urllib.parse.quote(file_id))
            elif mirror:
                task.origin = _join(mirror, fetch_rel)
            else:
                task.origin = f'gdrive:{file_id}'
        else:
            task.origin = _join(mirror, fetch_rel) if mirror else src.url
        tasks.append(task)
    return tasks


# ---------------------------------------------------------------------------------------------------------------------
# Bookkeeping


class Manifest:
    """`<root>/.dva_downloads.json`: {rel: record} for every verified file and unpacked archive."""

    def __init__(self, root: Path, readonly: bool = False) -> None:
        self.path, self.readonly = root / MANIFEST, readonly
        try:
            self.data = json.loads(self.path.read_text())['files']
        except (OSError, ValueError, KeyError, TypeError):
            self.data = {}

    def get(self, rel: str) -> dict | None:
        rec = self.data.get(rel)
        return rec if isinstance(rec, dict) else None

    def put(self, rel: str, rec: dict) -> None:
        self.data[rel] = rec
        self._save()

    def drop(self, rel: str) -> None:
        if self.data.pop(rel, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.readonly:
            return
        tmp = self.path.with_name(self.path.name + '.tmp')
        tmp.write_text(json.dumps({'version': 1, 'files': self.data}, indent=1, sort_keys=True) + '\n')
        os.replace(tmp, self.path)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(CHUNK), b''):
            h.update(block)
    return h.hexdigest()


def human(n: int) -> str:
    """Byte count as a short string: 1536 -> '1.5 KB'."""
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1000 or unit == 'GB':
            return f'{n} B' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000
    return ''


def _file_record(path: Path, sha: str, origin: str) -> dict:
    st = path.stat()
    return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'sha256': sha, 'source': origin}


def check_file(path: Path, rel: str, sha: str, size: int | None, manifest: Manifest) -> tuple[bool, str]:
    """Is `path` complete? Returns (complete, why). Re-hashes only when the manifest record does not match.

    Without a known sha256 or size, an existing file is complete: unchecked when there is no record ('present, not
    verified'), and kept when it differs from the recorded download (a user's own latent.pkl, say). --force replaces it.
    """
    if not path.is_file():
        return False, 'missing'
    st = path.stat()
    if size is not None and st.st_size != size:
        return False, f'size {st.st_size} != {size}'
    rec = manifest.get(rel)
    unchanged = rec is not None and (rec.get('size'), rec.get('mtime_ns')) == (st.st_size, st.st_mtime_ns)
    if unchanged and (not sha or rec.get('sha256') == sha):
        return True, 'complete'
    if sha:
        got = sha256_file(path)
        if got != sha:
            return False, f'sha256 {got[:12]}... != {sha[:12]}...'
        manifest.put(rel, _file_record(path, got, rec.get('source', '') if rec else ''))
        return True, 'complete, sha256 verified'
    if size is not None:
        return True, 'complete, size verified'
    if rec:
        if rec.get('size') == st.st_size and sha256_file(path) == rec.get('sha256'):
            manifest.put(rel, _file_record(path, rec['sha256'], rec.get('source', '')))
            return True, 'complete, sha256 verified'
        return True, 'present, changed since it was downloaded; kept (--force fetches it again)'
    return True, 'present, not verified'


# ---------------------------------------------------------------------------------------------------------------------
# Transfers


def _content_range(value: str) -> tuple[int | None, int | None]:
    """'bytes 10-99/100' -> (10, 100); 'bytes */100' -> (None, 100)."""
    m = re.match(r'\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)', value or '')
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != '*' else None
    return start, total


class _Progress:
    """A one-line progress meter on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total = label, total
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < 0.5):
            return
        self.last = now
        of = f' / {human(self.total)}' if self.total else ''
        sys.stderr.write(f'\r  {self.label}: {human(done)}{of}' + ('\n' if final else ''))
        sys.stderr.flush()


def http_download(url: str, part: Path, *, retries: int = 3, timeout: float = 60.0, progress: bool = False) -> bool:
    """Download `url` into `part`, continuing an existing `part` with an HTTP Range request.

    A server that ignores the Range header (200 instead of 206) makes the download start over. Network errors are
    retried `retries` times, each time resuming from what is on disk. Returns True when a Range request continued
    earlier bytes. Raises FetchError (the partial file is kept for a later resume).
    """
    resumed, attempt, restarted = False, 0, False
    while True:
        offset = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={'User-Agent': USER_AGENT, 'Accept-Encoding': 'identity'})
        if offset:
            req.add_header('Range', f'bytes={offset}-')
        try:
            with _urlopen(req, timeout=timeout) as resp:
                if offset and resp.status == 206:
                    start, total = _content_range(resp.headers.get('Content-Range', ''))
                    if start != offset:
                        raise FetchError(f'asked to resume at byte {offset}, the server answered from byte {start}')
                    mode, resumed = 'ab', True
                else:
                    length = resp.headers.get('Content-Length')
                    total = int(length) if length and length.isdigit() else None
                    mode, offset = 'wb', 0
                meter = _Progress(part.name.removesuffix('.part'), total, progress)
                done = offset
                with open(part, mode) as f:
                    for block in iter(lambda: resp.read(CHUNK), b''):
                        f.write(block)
                        done += len(block)
                        meter(done)
                meter(done, final=True)
            size = part.stat().st_size
            if total is not None and size != total:
                raise ConnectionError(f'the connection closed after {size} of {total} bytes')
            return resumed
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:
                _, total = _content_range(e.headers.get('Content-Range', ''))
                if total == offset:  # the partial file already holds every byte
                    return True
                if not restarted:  # longer than the remote file: start again, once
                    part.unlink()
                    restarted = True
                    continue
            if e.code < 500 or attempt >= retries:
                raise FetchError(f'HTTP {e.code} {e.reason}') from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if attempt >= retries:
                kept = part.stat().st_size if part.exists() else 0
                tail = f'; {human(kept)} kept in {part.name}, run again to resume' if kept else ''
                raise FetchError(f'{getattr(e, "reason", None) or e}{tail}') from None
        time.sleep(min(2.0**attempt, 10.0))
        attempt += 1


@dataclass
class Context:
    """What every task needs: the root, the manifest, the options and the report stream."""

    root: Path
    manifest: Manifest
    force: bool = False
    dry_run: bool = False
    keep_archives: bool = False
    retries: int = 3
    timeout: float = 60.0
    progress: bool = True
    out: TextIO = field(default_factory=lambda: sys.stdout)
    failures: list[str] = field(default_factory=list)

    def report(self, status: str, rel: str, detail: str = '') -> None:
        self.out.write(f'{status} {rel}' + (f' ({detail})' if detail else '') + '\n')
        self.out.flush()

    def fail(self, task: Task, rel: str, reason: str) -> None:
        source = task.origin or '-'
        self.report('FAILED', rel, f'{source}: {reason}')
        self.failures.append(f'{rel} <- {source}: {reason}')


def _verify(path: Path, sha: str, size: int | None) -> str:
    """sha256 of a finished download; raises FetchError (and deletes it) when size or sha256 is wrong."""
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        path.unlink()
        raise FetchError(f'size mismatch: expected {size} bytes, got {got_size}; the download was deleted')
    got = sha256_file(path)
    if sha and got != sha:
        path.unlink()
        raise FetchError(f'sha256 mismatch: expected {sha}, got {got}; the download was deleted')
    return got


def _part(path: Path) -> Path:
    return path.with_name(path.name + '.part')


def download(task: Task, ctx: Context, rel: str, sha: str = '', size: int | None = None) -> tuple[str, str]:
    """Fetch task.origin to root/rel through a partial file, verify it, then give it its final name.

    Returns (status, sha256) with status 'downloaded' or 'resumed'.
    """
    dest = ctx.root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if task.origin.startswith('gdrive:'):
        staged = dest.with_name(dest.name + '.gdown')  # gdown keeps its partial file as <staged>XXXXXXXX.part
        pattern = re.compile(re.escape(staged.name) + r'.{8}\.part')
        had_part = staged.exists() or any(pattern.fullmatch(p.name) for p in dest.parent.iterdir())
        if not staged.exists():
            gdown_download(task.origin.removeprefix('gdrive:'), staged, quiet=not ctx.progress)
        status = 'resumed' if had_part else 'downloaded'
    else:
        staged = _part(dest)
        resumed = http_download(task.origin, staged, retries=ctx.retries, timeout=ctx.timeout, progress=ctx.progress)
        status = 'resumed' if resumed else 'downloaded'
    got = _verify(staged, sha, size)
    os.replace(staged, dest)
    return status, got


# ---------------------------------------------------------------------------------------------------------------------
# Task runners


def run_file(task: Task, ctx: Context) -> None:
    """A plain file (a checkpoint, CLIP, one sample frame)."""
    dest = ctx.root / task.rel
    if not ctx.force:
        complete, why = check_file(dest, task.rel, task.sha256, task.size, ctx.manifest)
        if complete:
            return ctx.report('skipped', task.rel, why)
    if ctx.dry_run:
        return ctx.report('pending', task.rel, f'from {task.origin}')
    ctx.manifest.drop(task.rel)
    status, got = download(task, ctx, task.rel, task.sha256, task.size)
    ctx.manifest.put(task.rel, _file_record(dest, got, task.origin))
    ctx.report(status, task.rel, human(dest.stat().st_size))


def run_bz2(task: Task, ctx: Context) -> None:
    """A .bz2 download decompressed to dest (the dlib predictor)."""
    dest = ctx.root / task.rel
    if dest.exists() and not ctx.force:
        complete, why = check_file(dest, task.rel, task.sha256, task.size, ctx.manifest)
        if complete:
            return ctx.report('skipped', task.rel, why)
        if task.source.keep_existing:
            return ctx.report('skipped', task.rel, f'present and kept, but {why}: delete it to fetch {task.origin}')
    archive = ctx.root / task.fetch_rel
    if ctx.dry_run:
        return ctx.report('pending', task.rel, f'from {task.origin}')
    ctx.manifest.drop(task.rel)
    if not archive.is_file() or ctx.force:
        status, _ = download(task, ctx, task.fetch_rel)
        ctx.report(status, task.fetch_rel, human(archive.stat().st_size))
    part = _part(dest)
    try:
        with bz2.open(archive, 'rb') as src, open(part, 'wb') as f:
            shutil.copyfileobj(src, f, CHUNK)
    except (OSError, EOFError) as e:
        part.unlink(missing_ok=True)
        archive.unlink()
        raise FetchError(f'{task.fetch_rel} is not a valid bz2 file ({e}); it was deleted') from None
    try:
        got = _verify(part, task.sha256, task.size)
    except FetchError:
        archive.unlink()
        raise
    os.replace(part, dest)
    ctx.manifest.put(task.rel, _file_record(dest, got, task.origin))
    if not ctx.keep_archives:
        archive.unlink()
    ctx.report('unpacked', task.rel, human(dest.stat().st_size))


def _parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    return PurePosixPath(info.filename.replace('\\', '/')).parts


def _zip_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The zip's entries without junk; refuses absolute paths and '..' (path traversal)."""
    infos = []
    for info in zf.infolist():
        p = PurePosixPath(info.filename.replace('\\', '/'))
        if p.is_absolute() or '..' in p.parts or re.match(r'^[A-Za-z]:', info.filename):
            raise FetchError(f'unsafe member name {info.filename!r}')
        if p.parts and p.parts[0] not in JUNK and p.name not in JUNK:
            infos.append(info)
    return infos


def _unpack(archive: Path, dest: Path, required: tuple[str, ...]) -> dict[str, int]:
    """Unzip `archive` into the folder `dest`, merging item by item (other files in dest are kept).

    A zip whose entries all sit under one folder named like dest (`pretrained_models/...`) is unpacked without that
    level, as the released script (`unzip` in the root) would. Returns {path relative to dest: size} of its files.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        archive.unlink()
        raise FetchError(f'{archive.name} is not a valid zip ({e}); it was deleted, run again') from None
    with zf:
        try:
            infos = _zip_members(zf)
        except FetchError as e:
            archive.unlink()
            raise FetchError(f'{e}; {archive.name} was deleted') from None
        tops = {_parts(i)[0] for i in infos}
        strip = dest.name if tops == {dest.name} else ''
        staging = dest.parent / f'.{dest.name}.unpack'
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            try:
                for info in infos:
                    zf.extract(info, staging)
            except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a damaged download: fetch it again next time
                archive.unlink()
                raise FetchError(f'{archive.name} could not be unpacked ({e}); it was deleted, run again') from None
            content = staging / strip if strip else staging
            dest.mkdir(parents=True, exist_ok=True)
            for item in sorted(content.iterdir()):
                if item.name in JUNK:
                    continue
                target = dest / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                os.replace(item, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    members = {}
    for info in infos:
        if info.is_dir():
            continue
        parts = _parts(info)
        members['/'.join(parts[1:] if strip else parts)] = info.file_size
    missing = [m for m in required if not (dest / m).exists()]
    if missing:
        raise FetchError(f'{archive.name} does not contain {", ".join(missing)} (expected under {dest.name}/)')
    return members


def _zip_complete(rec: dict | None, dest: Path) -> bool:
    if not rec or not isinstance(rec.get('members'), dict):
        return False
    for m, size in rec['members'].items():
        p = dest / m
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def run_zip(task: Task, ctx: Context) -> None:
    """A zip downloaded to `<dest>.zip` and unpacked into the folder dest (then deleted unless --keep-archives)."""
    dest, archive = ctx.root / task.rel, ctx.root / task.fetch_rel
    rec = ctx.manifest.get(task.fetch_rel)
    if not ctx.force and _zip_complete(rec, dest):
        return ctx.report('skipped', task.rel + '/', f'complete, {len(rec["members"])} files from {task.fetch_rel}')
    if ctx.dry_run:
        what = f'unpack {task.fetch_rel}' if archive.is_file() and not ctx.force else f'from {task.origin}'
        return ctx.report('pending', task.rel + '/', what)
    ctx.manifest.drop(task.fetch_rel)
    if archive.is_file() and not ctx.force:
        got = sha256_file(archive)
        if task.sha256 and got != task.sha256:
            archive.unlink()
            archive_ok = False
        else:
            archive_ok = True
            ctx.report('skipped', task.fetch_rel, 'already downloaded')
    else:
        archive_ok = False
    if not archive_ok:
        status, got = download(task, ctx, task.fetch_rel, task.sha256, task.size)
        ctx.report(status, task.fetch_rel, human(archive.stat().st_size))
    members = _unpack(archive, dest, task.source.members)
    ctx.manifest.put(
        task.fetch_rel,
        {
            'size': archive.stat().st_size,
            'sha256': got,
            'source': task.origin,
            'unpacked_to': task.rel,
            'members': members,
        },
    )
    if not ctx.keep_archives:
        archive.unlink()
    ctx.report('unpacked', task.rel + '/', f'{len(members)} files')


RUNNERS = {'file': run_file, 'files': run_file, 'bz2': run_bz2, 'zip': run_zip}


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _names(values: list[str] | None) -> list[str]:
    return [n.strip() for v in values or [] for n in v.split(',') if n.strip()]


def print_table(tasks: list[Task], out: TextIO) -> None:
    """--list: one row per entry (name, destination, source, sha256)."""
    rows, seen = [('NAME', 'PATH', 'SOURCE', 'SHA256')], set()
    for t in tasks:
        src = t.source
        if src.name in seen:
            continue
        seen.add(src.name)
        if src.kind == 'files':
            path, origin = f'{src.dest}/ ({len(src.members)} files)', t.origin.rsplit('/', 1)[0] + '/'
        else:
            path = f'{src.dest}/ <- {t.fetch_rel}' if src.kind == 'zip' else src.dest
            origin = t.origin or f'({t.error})'
        rows.append((src.name, path, origin, t.sha256 or '-'))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    out.writelines('  '.join(c.ljust(w) for c, w in zip(r[:3], widths)) + '  ' + r[3] + '\n' for r in rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point of download_requirements.sh. Returns the exit status (0 ok, 1 a source failed, 2 bad usage)."""
    names = [s.name for s in SOURCES]
    p = argparse.ArgumentParser(
        prog='download_requirements.sh',
        description='Fetch the released DVA checkpoints, pretrained networks, '
        'datasets, CLIP weights and sample frames. Entries: ' + ', '.join(names) + '.',
        epilog='Environment: DVA_ROOT, DVA_MIRROR, DVA_GDRIVE_URL, DVA_GDRIVE_<NAME>, DVA_URL_<NAME>, '
        'DVA_SHA256_<NAME> (see tools/fetch.py).',
    )
    p.add_argument('--root', type=Path, default=None, help='project root (default: $DVA_ROOT, else the repo root)')
    p.add_argument(
        '--only', action='append', metavar='NAME', help='fetch only these entries (repeat or comma-separate)'
    )
    p.add_argument('--skip', action='append', metavar='NAME', help='leave these entries out')
    p.add_argument('--list', action='store_true', help='print the table of sources and exit')
    p.add_argument('--dry-run', action='store_true', help='report what would be fetched; write nothing')
    p.add_argument('--force', action='store_true', help='fetch again even when complete')
    p.add_argument('--keep-archives', action='store_true', help='keep the .zip/.bz2 files after unpacking')
    p.add_argument('--retries', type=int, default=3, help='retries (with resume) after a network error (default 3)')
    p.add_argument('--timeout', type=float, default=60.0, help='socket timeout in seconds (default 60)')
    p.add_argument('--quiet', action='store_true', help='no progress meters')
    args = p.parse_args(argv)

    only, skip = _names(args.only), _names(args.skip)
    unknown = sorted(set(only + skip) - set(names))
    if unknown:
        p.error(f'unknown entry {", ".join(unknown)}; choose from {", ".join(names)}')
    selected = tuple(s for s in SOURCES if (not only or s.name in only) and s.name not in skip)
    tasks = plan(selected, os.environ)
    if args.list:
        print_table(tasks, sys.stdout)
        return 0

    root = (args.root or Path(os.environ.get('DVA_ROOT') or ROOT)).expanduser().resolve()
    if not args.dry_run:
        root.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        root,
        Manifest(root, readonly=args.dry_run),
        force=args.force,
        dry_run=args.dry_run,
        keep_archives=args.keep_archives,
        retries=max(args.retries, 0),
        timeout=args.timeout,
        progress=not args.quiet,
    )
    for task in tasks:
        rel = task.rel + ('/' if task.source.kind == 'zip' else '')
        if task.error:
            ctx.fail(task, rel, task.error)
            continue
        try:
            RUNNERS[task.source.kind](task, ctx)
        except FetchError as e:
            ctx.fail(task, rel, str(e))
        except OSError as e:  # local trouble (disk full, permissions): name the file and go on with the others
            ctx.fail(task, rel, f'{type(e).__name__}: {e}')
    if ctx.failures:
        sys.stderr.write(f'error: {len(ctx.failures)} of {len(tasks)} files could not be fetched:\n')
        for line in ctx.failures:
            sys.stderr.write(f'  {line}\n')
        sys.stderr.write('Run again to resume; see `download_requirements.sh --help` for the source overrides.\n')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
