"""download_requirements.sh / tools/fetch.py against a local HTTP server (127.0.0.1 only; nothing leaves the machine).

Every source is redirected through the environment: DVA_MIRROR for the plain files, DVA_GDRIVE_URL for the Drive ids,
and a monkeypatched gdown for the one test of the gdown path. In-process runs also route every request through a guard
that refuses non-loopback hosts.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import threading
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_fetch():
    spec = importlib.util.spec_from_file_location('dva_fetch', ROOT / 'tools' / 'fetch.py')
    mod = importlib.util.module_from_spec(spec)
    sys.modules['dva_fetch'] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


fetch = _load_fetch()
SRC = {s.name: s for s in fetch.SOURCES}

# ----------------------------------------------------------------------------------------------------------------------
# A local server with HTTP Range support


class RangeHandler(BaseHTTPRequestHandler):
    """Serves files under `server.folder`; honours `Range: bytes=N-` unless `server.honour_range` is False."""

    def do_GET(self) -> None:
        srv = self.server
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip('/')
        path = (srv.folder / rel).resolve()
        srv.log.append((rel, self.headers.get('Range')))
        if srv.folder not in path.parents or not path.is_file():
            self.send_error(404, 'Not Found')
            return
        data = path.read_bytes()
        rng = self.headers.get('Range')
        if rng and srv.honour_range:
            start = int(rng.removeprefix('bytes=').split('-')[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header('Content-Range', f'bytes */{len(data)}')
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / 'www'
    folder.mkdir()
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), RangeHandler)
    httpd.folder, httpd.log, httpd.honour_range = folder.resolve(), [], True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    httpd.url = f'http://127.0.0.1:{httpd.server_address[1]}'
    yield httpd
    httpd.shutdown()
    httpd.server_close()


# ----------------------------------------------------------------------------------------------------------------------
# Fake released files


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


PRETRAINED = {  # with the top-level folder, as `unzip` in the root expects
    'pretrained_models/model_ir_se50.pth': b'irse50' * 100,
    'pretrained_models/mobilenet_224_model_best_gdconv_external.pth.tar': b'mobilenet' * 50,
    'pretrained_models/79999_iter.pth': b'bisenet' * 70,
    '__MACOSX/pretrained_models/._79999_iter.pth': b'junk',
}
DATASETS = {  # without a top-level folder
    'celebahq256.lmdb/data.mdb': b'lmdb' * 300,
    'celebahq256.lmdb/lock.mdb': b'lock',
    'celeba_anno/CelebAMask-HQ-attribute-anno.txt': b'30000\n5_o_Clock_Shadow Arched_Eyebrows\n',
}
DLIB = b'dlib predictor ' * 1000
ALEXNET = b'fake alexnet weights' * 10
CLIP = b'clip weights ' * 777
DRIVE = {  # Drive id -> content
    SRC['dva_ckpt'].gdrive_id: os.urandom(5000),
    SRC['latent'].gdrive_id: b'latent stats ' * 100,
    SRC['cls_ckpt'].gdrive_id: os.urandom(3000),
    SRC['pretrained_models'].gdrive_id: _zip(PRETRAINED),
    SRC['datasets'].gdrive_id: _zip(DATASETS),
}
FRAMES = {name: f'frame {name}'.encode() * 20 for name in fetch.SAMPLE_VIDEO_FRAMES}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def released(server, monkeypatch, tmp_path):
    """Serve the fake files and point every source at the server. Returns the target root."""
    www = server.folder
    for file_id, data in DRIVE.items():
        _write(www / 'gdrive' / file_id, data)
    _write(www / 'pretrained_models' / 'shape_predictor_68_face_landmarks.dat.bz2', bz2.compress(DLIB))
    _write(www / 'pretrained_models' / 'ViT-B-16.pt', CLIP)
    _write(www / 'pretrained_models' / 'alexnet-owt-7be5be79.pth', ALEXNET)
    for name, data in FRAMES.items():
        _write(www / 'sample_video' / name, data)
    for key in [k for k in os.environ if k.startswith('DVA_')]:
        monkeypatch.delenv(key)
    monkeypatch.setenv('DVA_MIRROR', server.url)
    monkeypatch.setenv('DVA_GDRIVE_URL', server.url + '/gdrive/{id}')
    monkeypatch.setenv('DVA_SHA256_DLIB_PREDICTOR', hashlib.sha256(DLIB).hexdigest())
    monkeypatch.setenv('DVA_SHA256_CLIP_VIT_B16', hashlib.sha256(CLIP).hexdigest())
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    real = fetch._urlopen

    def loopback_only(req, *args, **kwargs):
        host = urllib.parse.urlsplit(req.full_url).hostname
        assert host == '127.0.0.1', f'test tried to reach {req.full_url}'
        return real(req, *args, **kwargs)

    def no_gdown(*args, **kwargs):
        raise AssertionError('gdown must not be called when DVA_GDRIVE_URL is set')

    monkeypatch.setattr(fetch, '_urlopen', loopback_only)
    monkeypatch.setattr(fetch, 'gdown_download', no_gdown)
    return tmp_path / 'project'


def run(root: Path, *args: str, capsys) -> tuple[int, list[str], str]:
    code = fetch.main(['--root', str(root), '--retries', '0', '--quiet', *args])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def status_of(lines: list[str]) -> dict[str, str]:
    return {line.split(' ')[1]: line.split(' ')[0] for line in lines}


# ----------------------------------------------------------------------------------------------------------------------
# The table


def test_table_ids_match_spec_prefixes_and_clip_hash():
    prefixes = {
        'latent': '1J_eAs5-',
        'dva_ckpt': '1Q6z7Wmo9',
        'cls_ckpt': '1nddbwuAvIVE',
        'pretrained_models': '1X2u83hSO2',
        'datasets': '1Kk7U6aeu',
    }
    for name, prefix in prefixes.items():
        assert SRC[name].gdrive_id.startswith(prefix) and len(SRC[name].gdrive_id) == 33
    clip = SRC['clip_vit_b16']
    assert clip.sha256 in clip.url and clip.dest == 'pretrained_models/ViT-B-16.pt'
    assert SRC['dva_ckpt'].dest == 'checkpoints/diffusion_video_autoencoder/epoch=51-step=1000000.ckpt'
    assert len(SRC['sample_video'].members) == 100


def test_list_prints_every_entry(released, capsys):
    code, lines, _ = run(released, '--list', capsys=capsys)
    assert code == 0
    text = '\n'.join(lines)
    for s in fetch.SOURCES:
        assert s.name in text and s.dest in text
    assert not released.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Full run, idempotence, dry run


def test_first_run_downloads_everything_second_run_skips(released, server, capsys):
    code, lines, err = run(released, capsys=capsys)
    assert code == 0, err
    st = status_of(lines)
    for s in ('dva_ckpt', 'latent', 'cls_ckpt', 'clip_vit_b16', 'alexnet_lpips'):
        assert st[SRC[s].dest] == 'downloaded'
    assert st['pretrained_models/'] == 'unpacked' and st['datasets/'] == 'unpacked'
    assert st['pretrained_models.zip'] == 'downloaded'
    assert st['pretrained_models/shape_predictor_68_face_landmarks.dat.bz2'] == 'downloaded'
    assert st['pretrained_models/shape_predictor_68_face_landmarks.dat'] == 'unpacked'
    assert all(st[f'sample_video/{n}'] == 'downloaded' for n in FRAMES)

    r = released
    assert (r / SRC['dva_ckpt'].dest).read_bytes() == DRIVE[SRC['dva_ckpt'].gdrive_id]
    assert (r / SRC['latent'].dest).read_bytes() == DRIVE[SRC['latent'].gdrive_id]
    assert (r / SRC['cls_ckpt'].dest).read_bytes() == DRIVE[SRC['cls_ckpt'].gdrive_id]
    for name, data in PRETRAINED.items():
        if not name.startswith('__MACOSX'):
            assert (r / name).read_bytes() == data
    for name, data in DATASETS.items():
        assert (r / 'datasets' / name).read_bytes() == data
    assert not (r / '__MACOSX').exists() and not (r / 'pretrained_models' / '__MACOSX').exists()
    assert (r / 'pretrained_models/shape_predictor_68_face_landmarks.dat').read_bytes() == DLIB
    assert (r / 'pretrained_models/ViT-B-16.pt').read_bytes() == CLIP
    assert (r / 'pretrained_models/alexnet-owt-7be5be79.pth').read_bytes() == ALEXNET
    assert (r / 'sample_video/0042.jpeg').read_bytes() == FRAMES['0042.jpeg']
    leftovers = [p for p in r.rglob('*') if p.suffix in ('.part', '.zip', '.bz2', '.gdown') or '.unpack' in p.name]
    assert leftovers == []
    # Drive entries went through the Drive-id redirect, the rest through the mirror
    assert ('gdrive/' + SRC['dva_ckpt'].gdrive_id, None) in server.log

    files = {p: p.stat().st_mtime_ns for p in r.rglob('*') if p.is_file() and p.name != fetch.MANIFEST}
    server.log.clear()
    code, lines, err = run(released, capsys=capsys)
    assert code == 0, err
    assert lines and all(line.startswith('skipped ') for line in lines), lines
    assert server.log == []  # nothing requested
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_dry_run_writes_and_requests_nothing(released, server, capsys):
    code, lines, _ = run(released, '--dry-run', capsys=capsys)
    assert code == 0
    assert lines and all(line.startswith('pending ') for line in lines)
    assert f'pending {SRC["latent"].dest} (from {server.url}/gdrive/{SRC["latent"].gdrive_id})' in lines
    assert server.log == [] and not released.exists()


def test_only_and_skip_select_entries(released, capsys):
    code, lines, _ = run(released, '--only', 'latent,clip_vit_b16', '--skip', 'clip_vit_b16', capsys=capsys)
    assert code == 0
    assert lines == [f'downloaded {SRC["latent"].dest} (1.3 KB)']
    with pytest.raises(SystemExit) as e:
        fetch.main(['--root', str(released), '--only', 'nope'])
    assert e.value.code == 2
    assert 'unknown entry nope' in capsys.readouterr().err


def test_deleted_member_triggers_fetch_again(released, capsys):
    assert run(released, '--only', 'pretrained_models', capsys=capsys)[0] == 0
    (released / 'pretrained_models' / '79999_iter.pth').unlink()
    (released / 'pretrained_models' / 'extra.txt').write_text('mine')  # files not from the zip are kept
    code, lines, _ = run(released, '--only', 'pretrained_models', capsys=capsys)
    assert code == 0 and status_of(lines)['pretrained_models/'] == 'unpacked'
    assert (released / 'pretrained_models' / '79999_iter.pth').read_bytes() == PRETRAINED[
        'pretrained_models/79999_iter.pth'
    ]
    assert (released / 'pretrained_models' / 'extra.txt').read_text() == 'mine'


def test_file_changed_after_download_is_kept_unless_forced(released, capsys):
    assert run(released, '--only', 'latent', capsys=capsys)[0] == 0
    dest = released / SRC['latent'].dest
    dest.write_bytes(b'my own statistics from run_eval.py')
    code, lines, _ = run(released, '--only', 'latent', capsys=capsys)
    assert code == 0 and lines[0].startswith(f'skipped {SRC["latent"].dest} (present, changed since')
    assert dest.read_bytes() == b'my own statistics from run_eval.py'
    code, lines, _ = run(released, '--only', 'latent', '--force', capsys=capsys)
    assert code == 0 and lines[0].startswith('downloaded')
    assert dest.read_bytes() == DRIVE[SRC['latent'].gdrive_id]


def test_keep_existing_dlib_file_is_not_replaced(released, server, capsys):
    target = released / 'pretrained_models' / 'shape_predictor_68_face_landmarks.dat'
    _write(target, b'another predictor')
    code, lines, _ = run(released, '--only', 'dlib_predictor', capsys=capsys)
    assert code == 0 and lines[0].startswith(f'skipped {SRC["dlib_predictor"].dest} (present and kept')
    assert target.read_bytes() == b'another predictor' and server.log == []


# ----------------------------------------------------------------------------------------------------------------------
# Resume


def test_truncated_part_resumes_with_range(released, server, capsys):
    data = DRIVE[SRC['dva_ckpt'].gdrive_id]
    dest = released / SRC['dva_ckpt'].dest
    _write(dest.with_name(dest.name + '.part'), data[:1234])
    code, lines, _ = run(released, '--only', 'dva_ckpt', capsys=capsys)
    assert code == 0
    assert lines[0].startswith(f'resumed {SRC["dva_ckpt"].dest}')
    assert server.log == [('gdrive/' + SRC['dva_ckpt'].gdrive_id, 'bytes=1234-')]
    assert dest.read_bytes() == data and not dest.with_name(dest.name + '.part').exists()


def test_server_ignoring_range_restarts_from_scratch(released, server, capsys):
    server.honour_range = False
    dest = released / 'pretrained_models' / 'ViT-B-16.pt'
    _write(dest.with_name(dest.name + '.part'), b'garbage that is not a prefix')
    code, lines, _ = run(released, '--only', 'clip_vit_b16', capsys=capsys)
    assert code == 0 and lines[0].startswith('downloaded pretrained_models/ViT-B-16.pt')
    assert dest.read_bytes() == CLIP


def test_complete_part_is_finished_after_416(released, server, capsys):
    dest = released / 'pretrained_models' / 'ViT-B-16.pt'
    _write(dest.with_name(dest.name + '.part'), CLIP)
    code, lines, _ = run(released, '--only', 'clip_vit_b16', capsys=capsys)
    assert code == 0 and lines[0].startswith('resumed pretrained_models/ViT-B-16.pt')
    assert dest.read_bytes() == CLIP


# ----------------------------------------------------------------------------------------------------------------------
# Failures


def test_404_fails_naming_file_and_source(released, server, capsys):
    (server.folder / 'pretrained_models' / 'ViT-B-16.pt').unlink()
    code, lines, err = run(released, '--only', 'clip_vit_b16,latent', capsys=capsys)
    assert code == 1
    url = f'{server.url}/pretrained_models/ViT-B-16.pt'
    assert f'FAILED pretrained_models/ViT-B-16.pt ({url}: HTTP 404 Not Found)' in lines
    assert 'pretrained_models/ViT-B-16.pt' in err and url in err
    assert status_of(lines)[SRC['latent'].dest] == 'downloaded'  # the other entries still run
    assert not (released / 'pretrained_models' / 'ViT-B-16.pt').exists()


def test_sha256_mismatch_fails_and_claims_nothing(released, monkeypatch, capsys):
    monkeypatch.setenv('DVA_SHA256_CLIP_VIT_B16', '0' * 64)
    code, lines, err = run(released, '--only', 'clip_vit_b16', capsys=capsys)
    assert code == 1
    assert lines[0].startswith('FAILED pretrained_models/ViT-B-16.pt') and 'sha256 mismatch' in lines[0]
    assert 'sha256 mismatch' in err
    dest = released / 'pretrained_models' / 'ViT-B-16.pt'
    assert not dest.exists() and not dest.with_name(dest.name + '.part').exists()
    manifest = released / fetch.MANIFEST
    assert not manifest.exists() or 'pretrained_models/ViT-B-16.pt' not in json.loads(manifest.read_text())['files']
    # A wrong file already in place is not taken as complete either: it is fetched again
    monkeypatch.setenv('DVA_SHA256_CLIP_VIT_B16', hashlib.sha256(CLIP).hexdigest())
    _write(dest, b'wrong')
    code, lines, _ = run(released, '--only', 'clip_vit_b16', capsys=capsys)
    assert code == 0 and lines[0].startswith('downloaded') and dest.read_bytes() == CLIP


def test_zip_without_expected_member_fails(released, server, capsys):
    _write(server.folder / 'gdrive' / SRC['datasets'].gdrive_id, _zip({'celeba_anno/other.txt': b'x'}))
    code, lines, _ = run(released, '--only', 'datasets', capsys=capsys)
    assert code == 1
    assert status_of(lines)['datasets/'] == 'FAILED'
    assert 'celebahq256.lmdb' in lines[-1] and 'CelebAMask-HQ-attribute-anno.txt' in lines[-1]
    manifest = released / fetch.MANIFEST
    assert not manifest.exists() or 'datasets.zip' not in json.loads(manifest.read_text())['files']


def test_corrupt_zip_and_unsafe_member_fail(released, server, capsys):
    _write(server.folder / 'gdrive' / SRC['datasets'].gdrive_id, b'not a zip at all')
    code, lines, _ = run(released, '--only', 'datasets', capsys=capsys)
    assert code == 1 and 'not a valid zip' in lines[-1]
    assert not (released / 'datasets.zip').exists()
    _write(server.folder / 'gdrive' / SRC['datasets'].gdrive_id, _zip({'../evil.txt': b'x'}))
    code, lines, _ = run(released, '--only', 'datasets', capsys=capsys)
    assert code == 1 and 'unsafe member' in lines[-1]
    assert not (released.parent / 'evil.txt').exists() and not (released / 'datasets.zip').exists()
    damaged = bytearray(DRIVE[SRC['datasets'].gdrive_id])
    damaged[damaged.index(b'lmdblmdb') + 5] ^= 0xFF  # a flipped byte in stored member data: bad CRC
    _write(server.folder / 'gdrive' / SRC['datasets'].gdrive_id, bytes(damaged))
    code, lines, _ = run(released, '--only', 'datasets', capsys=capsys)
    assert code == 1 and 'could not be unpacked' in lines[-1] and 'CRC' in lines[-1]
    assert not (released / 'datasets.zip').exists()


def test_unknown_drive_id_names_the_variable(released, monkeypatch, capsys):
    monkeypatch.setenv('DVA_GDRIVE_DVA_CKPT', '')
    code, lines, err = run(released, '--only', 'dva_ckpt', capsys=capsys)
    assert code == 1
    assert 'DVA_GDRIVE_DVA_CKPT' in lines[0] and 'DVA_GDRIVE_DVA_CKPT' in err


# ----------------------------------------------------------------------------------------------------------------------
# The gdown path (stubbed) and the shell wrapper


def test_drive_entries_go_through_gdown(released, monkeypatch, capsys):
    monkeypatch.delenv('DVA_GDRIVE_URL')
    monkeypatch.delenv('DVA_MIRROR')
    calls = []

    def fake_gdown(file_id: str, output: Path, quiet: bool) -> None:
        calls.append((file_id, output))
        output.write_bytes(DRIVE[file_id])

    monkeypatch.setattr(fetch, 'gdown_download', fake_gdown)
    monkeypatch.setenv('DVA_GDRIVE_LATENT', SRC['cls_ckpt'].gdrive_id)  # an id override is honoured
    code, lines, _ = run(released, '--only', 'latent', capsys=capsys)
    assert code == 0 and lines[0].startswith(f'downloaded {SRC["latent"].dest}')
    assert [c[0] for c in calls] == [SRC['cls_ckpt'].gdrive_id]
    dest = released / SRC['latent'].dest
    assert calls[0][1].parent == dest.parent and dest.read_bytes() == DRIVE[SRC['cls_ckpt'].gdrive_id]
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_shell_wrapper(released, server):
    env = dict(os.environ, PYTHON=sys.executable)  # with the fixture's DVA_* redirects, all to 127.0.0.1
    cmd = ['bash', str(ROOT / 'download_requirements.sh'), '--root', str(released), '--retries', '0']
    ok = subprocess.run([*cmd, '--only', 'latent'], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f'downloaded {SRC["latent"].dest}')
    (server.folder / 'sample_video' / '0007.jpeg').unlink()
    bad = subprocess.run(
        [*cmd, '--only', 'sample_video'], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 1
    assert f'FAILED sample_video/0007.jpeg ({server.url}/sample_video/0007.jpeg: HTTP 404' in bad.stdout
    assert 'sample_video/0007.jpeg' in bad.stderr and 'error: 1 of 100' in bad.stderr
