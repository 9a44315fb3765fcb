"""download_requirements.sh / tools/fetch.py against a local HTTP server on 127.0.0.1 (nothing leaves the machine)."""
from __future__ import annotations

import bz2
import hashlib
import io
import socket
import subprocess
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tools import fetch

ROOT = Path(__file__).resolve().parents[1]


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves the folder, honouring `Range: bytes=N-` (what a resumed transfer sends) and logging every request."""

    def do_GET(self) -> None:
        self.server.log.append((self.path, self.headers.get('Range')))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return self.send_error(500 if self.path.endswith('/broken') else 404)
        data, start = path.read_bytes(), int((self.headers.get('Range') or 'bytes=0-')[6:].split('-')[0])
        self.send_response(206 if start else 200)
        if start:
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.send_header('Content-Length', str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


SRC = {s.name: s for s in fetch.SOURCES}
DLIB, CLIP = b'dlib predictor ' * 1000, b'clip weights ' * 777
FILES = {  # what the mirror serves, laid out as DVA_MIRROR expects
    SRC['dva_ckpt'].dest: b'ckpt' * 5000, SRC['latent'].dest: b'latent' * 100, SRC['cls_ckpt'].dest: b'cls' * 300,
    'pretrained_models.zip': _zip({f'pretrained_models/{m}': m.encode() * 50 for m in SRC['pretrained_models'].members}
                                  | {'__MACOSX/pretrained_models/._x': b'junk'}),
    'datasets.zip': _zip({'celebahq256.lmdb/data.mdb': b'lmdb', 'celeba_anno/CelebAMask-HQ-attribute-anno.txt': b'a'}),
    SRC['dlib_predictor'].dest + '.bz2': bz2.compress(DLIB), SRC['clip_vit_b16'].dest: CLIP,
    SRC['alexnet_lpips'].dest: b'alexnet' * 10,
    **{f'sample_video/{m}': m.encode() * 20 for m in fetch.SAMPLE_VIDEO_FRAMES},
}


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    www = tmp_path / 'www'
    for rel, data in FILES.items():
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        (www / rel).write_bytes(data)
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), lambda *a: RangeHandler(*a, directory=str(www)))
    httpd.log = []
    threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
    url = f'http://127.0.0.1:{httpd.server_address[1]}'
    for key, value in {'DVA_MIRROR': url, 'DVA_ROOT': str(tmp_path / 'root'), 'NO_PROXY': '127.0.0.1',
                       'DVA_SHA256_DLIB_PREDICTOR': hashlib.sha256(DLIB).hexdigest(),
                       'DVA_SHA256_CLIP_VIT_B16': hashlib.sha256(CLIP).hexdigest()}.items():
        monkeypatch.setenv(key, value)
    yield httpd, tmp_path / 'root'
    httpd.shutdown()
    httpd.server_close()


def run(*args: str) -> tuple[int, str, str]:
    """download_requirements.sh with `args` in a subprocess (the shell wrapper, as users run it)."""
    p = subprocess.run(['bash', str(ROOT / 'download_requirements.sh'), '--quiet', *args], capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_registry_ids_and_default_urls() -> None:
    tasks = {t.name: t for t in fetch.plan(fetch.SOURCES, {'DVA_GDRIVE_LATENT': 'new-id'})}
    for name, prefix in [('latent', 'new-id'), ('dva_ckpt', '1Q6z7Wmo9'), ('cls_ckpt', '1nddbwuAvIVE'),
                         ('pretrained_models', '1X2u83hSO2'), ('datasets', '1Kk7U6aeu')]:
        assert tasks[name].url.startswith(f'https://drive.google.com/uc?id={prefix}')
    assert tasks['clip_vit_b16'].sha256 in tasks['clip_vit_b16'].url and tasks['dlib_predictor'].size == 99_693_937


def test_fetch_everything_then_skip_everything(mirror) -> None:
    httpd, root = mirror
    code, out, err = run()
    assert code == 0, err
    lines = out.splitlines()  # one per file: 5 files and 100 frames downloaded, 2 zips and 1 bz2 unpacked
    assert sum(x.startswith('downloaded ') for x in lines) == 105 and sum(x.startswith('unpacked ') for x in lines) == 3
    assert (root / SRC['dlib_predictor'].dest).read_bytes() == DLIB
    assert (root / SRC['clip_vit_b16'].dest).read_bytes() == CLIP
    for m in SRC['pretrained_models'].members:  # the zip's top folder is not doubled, the junk is left out
        assert (root / 'pretrained_models' / m).read_bytes() == m.encode() * 50
    assert (root / 'datasets/celeba_anno/CelebAMask-HQ-attribute-anno.txt').read_bytes() == b'a'
    assert not list(root.glob('*.zip')) and not list(root.rglob('*.bz2')) and not (root / '__MACOSX').exists()
    assert len(list((root / 'sample_video').iterdir())) == 100
    assert (root / SRC['latent'].dest).stat().st_mode & 0o077  # the usual mode, not the temporary file's 0600
    httpd.log.clear()
    code, out, _ = run()
    assert code == 0 and out.count('skipped ') == len(out.splitlines()) == 108 and httpd.log == []  # no request


def test_interrupted_download_resumes(mirror) -> None:
    httpd, root = mirror
    ckpt = root / SRC['dva_ckpt'].dest
    ckpt.parent.mkdir(parents=True)
    ckpt.with_name(ckpt.name + '.gdownabcd1234.part').write_bytes(FILES[SRC['dva_ckpt'].dest][:7000])  # gdown's name
    code, out, err = run('--only', 'dva_ckpt')
    assert code == 0, err
    assert f'resumed {SRC["dva_ckpt"].dest}' in out and ckpt.read_bytes() == FILES[SRC['dva_ckpt'].dest]
    assert any(r == 'bytes=7000-' for _, r in httpd.log) and not list(ckpt.parent.glob('*.part'))


def test_bad_hash_and_missing_file_fail_naming_the_source(mirror, monkeypatch) -> None:
    _, root = mirror
    monkeypatch.setenv('DVA_SHA256_CLIP_VIT_B16', '0' * 64)
    monkeypatch.setenv('DVA_URL_ALEXNET_LPIPS', fetch._join(fetch.os.environ['DVA_MIRROR'], 'missing.pth'))
    monkeypatch.setenv('DVA_URL_DATASETS', fetch._join(fetch.os.environ['DVA_MIRROR'], SRC['latent'].dest))  # no zip
    monkeypatch.setenv('DVA_URL_CLS_CKPT', fetch._join(fetch.os.environ['DVA_MIRROR'], 'broken'))  # server error
    code, out, err = run('--only', 'clip_vit_b16,alexnet_lpips,latent,datasets,cls_ckpt', '--retries', '0')
    assert code == 1 and 'downloaded checkpoints/diffusion_video_autoencoder/latent.pkl' in out
    assert 'FAILED datasets/' in out and not (root / 'datasets.zip').exists()  # refetched next time
    assert 'FAILED pretrained_models/ViT-B-16.pt' in out and 'FAILED pretrained_models/alexnet' in out
    assert 'FAILED checkpoints/diffusion_video_autoencoder_cls/last.ckpt' in out and '500' in out
    assert 'error: 4 of 5 files' in err and 'missing.pth: download it to' in err
    assert 'ViT-B-16.pt: download it to' in err
    assert not (root / SRC['clip_vit_b16'].dest).exists()  # a file that fails its hash is never given its name


def test_unreachable_host_fails_fast_and_once(tmp_path, monkeypatch) -> None:
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    monkeypatch.setenv('DVA_MIRROR', f'http://127.0.0.1:{port}')  # the Drive entries too
    monkeypatch.setenv('DVA_ROOT', str(tmp_path))
    start = time.monotonic()
    code, out, err = run()
    assert code == 1 and time.monotonic() - start < 15
    assert out.count(f'cannot reach 127.0.0.1:{port}') == 1 and 'check the network or use the mirror overrides' in out
    assert 'error: 108 of 108 files' in err and err.count('sample_video/ (100 files)') == 1
    assert len(err.splitlines()) == 2 + len(fetch.SOURCES)  # one line per entry, printed once


def test_dry_run_and_list_write_nothing(mirror) -> None:
    httpd, root = mirror
    code, out, _ = run('--dry-run', '--skip', 'sample_video')
    assert code == 0 and out.count('pending ') == 8 and not root.exists() and httpd.log == []
    code, out, _ = run('--list')
    assert code == 0 and [x.split()[0] for x in out.splitlines()] == [s.name for s in fetch.SOURCES]
    assert out.splitlines()[-1].split()[1] == 'sample_video/'  # the folder, not its first frame
    assert run('--only', 'nope')[0] == 2
