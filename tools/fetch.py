"""Fetch the released DVA files (checkpoints, frozen nets, CelebA-HQ data, CLIP, sample frames) into a project root.

pooch keeps the books (known sha256 checked, zips and the bz2 unpacked by its processors, a file named only once
verified); gdown does every transfer, Drive ids and plain URLs alike, and resumes its partial file
(`<file>.gdownXXXXXXXX.part`). Complete files are skipped. One line per file: `skipped|downloaded|resumed|unpacked|
pending|FAILED <path> (<detail>)`; an unreachable host is reported once and not retried. Failures are listed at the
end with how to fetch each by hand; exit status 1 (2 on bad usage).

Environment overrides (the tests point everything at a local server): DVA_ROOT (project root; --root wins);
DVA_MIRROR (base URL laid out like the root, archives as `pretrained_models.zip`, `...dat.bz2`); per entry NAME:
DVA_GDRIVE_<NAME> (Drive id), DVA_URL_<NAME> (its URL; sample_video: the folder), DVA_SHA256_<NAME> ('' disables the
check and the built-in size). Precedence: DVA_URL_<NAME>, DVA_MIRROR, the registry.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

# The registry. Drive ids are those of the released download_requirements.sh (gmkim-ai/Diffusion-Video-Autoencoders);
# no hash is published for them. CLIP's sha256 is the one in OpenAI's URL; dlib's is that of dlib.net's file as
# redistributed in the face-recognition-models 0.3.0 wheel. The sample frames are pinned to the commit that added them.
SAMPLE_VIDEO_COMMIT = 'f0c13f0de9a239bf735c24bc2174e60d0a88fa19'
SAMPLE_VIDEO_FRAMES = tuple(f'{i:04d}.jpeg' for i in range(100))
CLIP_SHA = '5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f'


@dataclass(frozen=True)
class Source:
    """name: the --only key and the <NAME> of the overrides. kind: 'file'; 'zip' (`<dest>.zip` unpacked into the
    folder dest, `members` must exist after); 'bz2' (`<dest>.bz2` decompressed to dest); 'files' (the `members` of
    the folder dest, each from `<url>/<member>`)."""

    name: str
    dest: str
    kind: str
    url: str = ''
    gdrive_id: str = ''
    sha256: str = ''
    size: int | None = None
    members: tuple[str, ...] = ()

    @property
    def archive(self) -> str:
        """The file downloaded: dest itself, or the archive unpacked into dest."""
        return {'zip': f'{self.dest}.zip', 'bz2': f'{self.dest}.bz2'}.get(self.kind, self.dest)


SOURCES = (
    Source('dva_ckpt', 'checkpoints/diffusion_video_autoencoder/epoch=51-step=1000000.ckpt', 'file',
           gdrive_id='1Q6z7Wmo9xve5SgfDJExohpDSSNi4QxcH'),
    Source('latent', 'checkpoints/diffusion_video_autoencoder/latent.pkl', 'file',
           gdrive_id='1J_eAs5-KWn--kmcqx5S-QjVPskTczTMU'),
    Source('cls_ckpt', 'checkpoints/diffusion_video_autoencoder_cls/last.ckpt', 'file',
           gdrive_id='1nddbwuAvIVEqKkkmUF96nJj91jVmAdtR'),
    Source('pretrained_models', 'pretrained_models', 'zip', gdrive_id='1X2u83hSO2jObO6pCCpZXa45qpQU2ECKJ',
           members=('model_ir_se50.pth', 'mobilenet_224_model_best_gdconv_external.pth.tar', '79999_iter.pth')),
    Source('dlib_predictor', 'pretrained_models/shape_predictor_68_face_landmarks.dat', 'bz2',
           url='https://dlib.net/files/shape_predictor_68_face_landmarks.dat.bz2', size=99_693_937,
           sha256='fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f'),
    Source('clip_vit_b16', 'pretrained_models/ViT-B-16.pt', 'file', sha256=CLIP_SHA,
           url=f'https://openaipublic.azureedge.net/clip/models/{CLIP_SHA}/ViT-B-16.pt'),
    Source('alexnet_lpips', 'pretrained_models/alexnet-owt-7be5be79.pth', 'file',
           url='https://download.pytorch.org/models/alexnet-owt-7be5be79.pth'),
    Source('datasets', 'datasets', 'zip', gdrive_id='1Kk7U6aeuQCY2-lhOOXxzTbxa5AYidsK2',
           members=('celebahq256.lmdb', 'celeba_anno/CelebAMask-HQ-attribute-anno.txt')),
    Source('sample_video', 'sample_video', 'files', members=SAMPLE_VIDEO_FRAMES,
           url=f'https://raw.githubusercontent.com/gmkim-ai/Diffusion-Video-Autoencoders/{SAMPLE_VIDEO_COMMIT}/sample_video'),
)
ROOT = Path(__file__).resolve().parents[1]
JUNK = ('__MACOSX', '.DS_Store')


def _join(base: str, rel: str) -> str:
    return base.rstrip('/') + '/' + urllib.parse.quote(rel)


def plan(sources: tuple[Source, ...], env: Mapping[str, str]) -> list[Source]:
    """One Source per file to fetch (a 'files' entry: one per member), the overrides of the module docstring applied."""
    mirror, tasks = env.get('DVA_MIRROR', ''), []
    for s in sources:
        k = s.name.upper()
        sha, size = (env[f'DVA_SHA256_{k}'].strip().lower(), None) if f'DVA_SHA256_{k}' in env else (s.sha256, s.size)
        override = env.get(f'DVA_URL_{k}', '')
        if s.kind == 'files':
            base = override or (mirror and _join(mirror, s.dest)) or s.url
            tasks += [replace(s, dest=f'{s.dest}/{m}', url=_join(base, m), members=()) for m in s.members]
            continue
        drive = s.gdrive_id and f'https://drive.google.com/uc?id={env.get(f"DVA_GDRIVE_{k}", s.gdrive_id).strip()}'
        url = override or (mirror and _join(mirror, s.archive)) or drive or s.url
        tasks.append(replace(s, url=url, sha256=sha, size=size))
    return tasks


def complete(task: Source, root: Path) -> str:
    """Why the task's result is already in place ('' when it is not): members present, size and sha256 right."""
    import pooch

    dest = root / task.dest
    if task.kind == 'zip':
        return 'complete' if all((dest / m).exists() for m in task.members) else ''
    if not dest.is_file() or (task.size is not None and dest.stat().st_size != task.size):
        return ''
    if task.sha256 and pooch.file_hash(str(dest)) != task.sha256:
        return ''
    return 'complete, sha256 verified' if task.sha256 else 'present'


def unreachable(urls: list[str], timeout: float) -> dict[str, str]:
    """{url: why its host cannot be reached ('' when it accepts a TCP connection)}; every host probed once, all in
    parallel, so that a machine without a route to them learns it in seconds."""
    from concurrent.futures import ThreadPoolExecutor

    def probe(host: tuple[str, int]) -> str:
        try:
            socket.create_connection(host, timeout=timeout).close()
            return ''
        except OSError as e:
            return f'cannot reach {host[0]}:{host[1]} ({e}): check the network or use the mirror overrides'

    parts = {u: urllib.parse.urlsplit(u) for u in urls}
    host = {u: (p.hostname or '', p.port or (443 if p.scheme == 'https' else 80)) for u, p in parts.items()}
    with ThreadPoolExecutor(max(1, len(set(host.values())))) as pool:
        why = dict(zip(set(host.values()), pool.map(probe, set(host.values()))))
    return {u: why[h] for u, h in host.items()}


class GdownDownloader:
    """A pooch downloader that lets gdown fetch into a fixed staging name next to the file, so that an interrupted
    transfer resumes on the next run (pooch's own HTTP downloader restarts from zero in a random temporary file)."""

    def __init__(self, dest: Path, quiet: bool, timeout: float, retries: int) -> None:
        self.staged = dest.with_name(dest.name + '.gdown')
        self.quiet, self.timeout, self.retries = quiet, timeout, retries
        self.resumed = any(p.name.endswith('.part') for p in dest.parent.glob(self.staged.name + '*'))
        self.called = False

    def __call__(self, url: str, output_file: str, pooch: object) -> None:
        import gdown

        self.called = True
        gdown.download(url=url, output=str(self.staged), quiet=self.quiet, resume=True, timeout=self.timeout,
                       retries=self.retries)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.staged, 0o666 & ~umask)  # gdown's (and pooch's) temporary files are 0600
        os.replace(self.staged, output_file)


def _unpack(paths: list[str], task: Source, root: Path) -> int:
    """Move the files unzipped into a staging folder into dest (dropping one top folder named like dest, as the
    released `unzip` in the root would) and check the members; returns the number of files."""
    dest = root / task.dest
    staging = dest.with_name(f'.{dest.name}.unpack')
    tops = {p.name for p in staging.iterdir() if p.name not in JUNK}
    content = staging / dest.name if tops == {dest.name} else staging
    dest.mkdir(parents=True, exist_ok=True)
    for item in content.iterdir():
        if item.name not in JUNK:
            target = dest / item.name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            os.replace(item, target)
    shutil.rmtree(staging)
    missing = [m for m in task.members if not (dest / m).exists()]
    if missing:
        raise ValueError(f'{task.archive} does not contain {", ".join(missing)}')
    return sum(1 for p in paths if JUNK[0] not in p)


def fetch(task: Source, root: Path, args: argparse.Namespace) -> tuple[str, str]:
    """Download (and unpack) one task; returns (status, detail) for its line."""
    import pooch

    dest, kind = root / task.archive, task.kind
    dest.parent.mkdir(parents=True, exist_ok=True)
    down = GdownDownloader(dest, args.quiet, args.timeout, args.retries)
    processor = {'zip': pooch.Unzip(extract_dir=f'.{Path(task.dest).name}.unpack'),  # beside the archive
                 'bz2': pooch.Decompress(method='bzip2', name=Path(task.dest).name)}.get(kind)
    known = f'sha256:{task.sha256}' if task.sha256 and kind != 'bz2' else None  # bz2: the hash of what it holds
    stale = [dest] if args.force or kind in ('file', 'files') else [root / task.dest] if kind == 'bz2' else []
    for path in stale:  # incomplete (or --force): pooch must not take it for done
        path.unlink(missing_ok=True)
    try:
        out = pooch.retrieve(task.url, known, fname=dest.name, path=dest.parent, processor=processor, downloader=down)
    except Exception:
        if kind in ('zip', 'bz2'):  # an archive that does not unpack is fetched again next time
            dest.unlink(missing_ok=True)
        raise
    status = 'resumed' if down.resumed else 'downloaded' if down.called else 'archive present'
    if kind in ('file', 'files'):
        return status, f'{dest.stat().st_size:,} bytes'
    if kind == 'bz2' and not complete(task, root):
        Path(out).unlink()
        dest.unlink()
        raise ValueError(f'{task.dest} unpacked from {task.archive} does not match its size or sha256')
    n = _unpack(out, task, root) if kind == 'zip' else 1
    if not args.keep_archives:
        dest.unlink()
    return 'unpacked', f'{status} {task.archive}, {n} file(s)'


def by_hand(task: Source, root: Path, n: int = 1) -> str:
    """How to fetch a failed task's file (or, n > 1, the entry's n failed files) without this tool."""
    if task.kind == 'files' and n > 1:
        folder = Path(task.dest).parent
        return f'{folder}/ ({n} files) <- {task.url.rsplit("/", 1)[0]}/<name>: download them into {root / folder}/'
    page = f'https://drive.google.com/file/d/{task.gdrive_id}' if 'drive.google.com' in task.url else task.url
    return f'{task.dest} <- {page}: download it to {root / task.archive}, then run again'


def main(argv: list[str] | None = None) -> int:
    """Entry point of download_requirements.sh. Returns the exit status (0 ok, 1 a source failed, 2 bad usage)."""
    names = [s.name for s in SOURCES]
    p = argparse.ArgumentParser(prog='download_requirements.sh', description='Fetch the released DVA files. '
                                'Entries: ' + ', '.join(names) + '. Source overrides: see tools/fetch.py.')
    p.add_argument('--root', type=Path, help='project root (default: $DVA_ROOT, else the repo root)')
    p.add_argument('--only', action='append', metavar='NAME', help='fetch only these entries (repeat or a,b)')
    p.add_argument('--skip', action='append', metavar='NAME', help='leave these entries out')
    p.add_argument('--list', action='store_true', help='print the table of sources and exit')
    p.add_argument('--dry-run', action='store_true', help='report what would be fetched; write nothing')
    p.add_argument('--force', action='store_true', help='fetch again even when complete')
    p.add_argument('--keep-archives', action='store_true', help='keep the .zip/.bz2 files after unpacking')
    p.add_argument('--retries', type=int, default=3, help='retries (resuming) after a broken transfer (default 3)')
    p.add_argument('--timeout', type=float, default=30.0, help='connect/read timeout in seconds (default 30)')
    p.add_argument('--quiet', action='store_true', help='no progress meters')
    args = p.parse_args(argv)
    only, skip = ([n for v in vals or [] for n in v.split(',') if n] for vals in (args.only, args.skip))
    if set(only + skip) - set(names):
        p.error(f'unknown entry {", ".join(sorted(set(only + skip) - set(names)))}; choose from {", ".join(names)}')
    tasks = plan(tuple(s for s in SOURCES if (not only or s.name in only) and s.name not in skip), os.environ)
    if args.list:
        for t in {t.name: t for t in tasks}.values():  # one row per entry
            folder = t.kind == 'files'
            where, url = (f'{Path(t.dest).parent}/', t.url.rsplit('/', 1)[0] + '/') if folder else (t.dest, t.url)
            print(f'{t.name:18} {where:70} {url} {t.sha256 or "-"}')
        return 0
    import pooch

    pooch.get_logger().setLevel('WARNING')
    root = (args.root or Path(os.environ.get('DVA_ROOT') or ROOT)).expanduser().resolve()
    done = ['' if args.force else complete(t, root) for t in tasks]
    hosts = {} if args.dry_run else unreachable([t.url for t, d in zip(tasks, done) if not d], min(args.timeout, 10))
    failures: dict[str, list] = {}  # per entry: its first failed task, the first reason, files failed
    reported = set()
    for t, why in zip(tasks, done):
        rel = t.dest + ('/' if t.kind == 'zip' else '')
        if why or args.dry_run:
            print(f'skipped {rel} ({why})' if why else f'pending {rel} (from {t.url})')
            continue
        cut_off = hosts.get(t.url, '')
        try:
            if cut_off:
                raise ConnectionError(cut_off)
            status, detail = fetch(t, root, args)
            print(f'{status} {rel} ({detail})')
        except Exception as e:  # noqa: BLE001 - gdown, requests, pooch and the disk raise many types: report all
            reason = cut_off.split(' (')[0] if cut_off else ' '.join(str(e).split())[:300] or type(e).__name__
            if not cut_off or cut_off not in reported:  # an unreachable host is reported once
                print(f'FAILED {cut_off}' if cut_off else f'FAILED {rel} ({reason})')
                reported.add(cut_off)
            failures.setdefault(t.name, [t, reason, 0])[2] += 1
        sys.stdout.flush()
    if failures:
        print(f'error: {sum(f[2] for f in failures.values())} of {len(tasks)} files could not be fetched:',
              file=sys.stderr)
        for t, reason, n in failures.values():
            print(f'  {by_hand(t, root, n)} ({reason})', file=sys.stderr)
        print('Run again to resume; see tools/fetch.py for the mirror overrides.', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
