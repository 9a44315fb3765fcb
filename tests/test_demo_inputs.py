"""The demo's upload checks, frame cap, session folders and job stopping, without a browser or a model."""
from __future__ import annotations

import os
import stat
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.inputs import InputError, Sessions, check_upload, extract_frames, parse_size, read_logins, select_frames
from demo.jobs import Cancelled, Worker, parse_scales, safe_name


def png_bytes(tmp_path: Path, size=(8, 6)) -> bytes:
    p = tmp_path / 'frame.png'
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(p)
    return p.read_bytes()


def make_zip(path: Path, entries: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, 'w') as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, '/etc/passwd')
    return path


def test_parse_size():
    assert parse_size('500MB') == 500_000_000
    assert parse_size('2 GB') == 2_000_000_000
    assert parse_size('64KiB') == 65536
    assert parse_size('1234') == 1234
    with pytest.raises(ValueError, match='not a size'):
        parse_size('lots')


def test_login_file(tmp_path):
    good = tmp_path / 'logins.txt'
    good.write_text('# who may use the page\n\nann:pa:ss:word\n  bob:x  \n')
    assert read_logins(good) == [('ann', 'pa:ss:word'), ('bob', 'x')]
    for text, message in (('ann\n', 'line 1: expected user:password'), ('# only a comment\n', 'no user:password'),
                          ('ann:\n', 'line 1'), (':secret\n', 'line 1')):
        good.write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            read_logins(good)
        assert 'secret' not in str(e.value)  # a password is never echoed
    with pytest.raises(ValueError, match='cannot read the login file'):
        read_logins(tmp_path / 'missing.txt')


def test_check_upload_kind_and_size(tmp_path, test_videos_dir):
    video = test_videos_dir / 'sample_24f_540p.mp4'
    assert check_upload(video, 10**9) == 'video'
    with pytest.raises(InputError, match=r'sample_24f_540p.mp4 is 117 kB, over the upload limit of 100 kB'):
        check_upload(video, 100_000)
    empty = tmp_path / 'empty.mp4'
    empty.write_bytes(b'')
    with pytest.raises(InputError, match='empty.mp4 is empty'):
        check_upload(empty, 10**9)
    notes = tmp_path / 'notes.txt'
    notes.write_text('not a video')
    with pytest.raises(InputError, match='notes.txt is not a video file .* nor a zip of frames'):
        check_upload(notes, 10**9)
    frames = make_zip(tmp_path / 'frames.bin', {'a.png': png_bytes(tmp_path)})
    assert check_upload(frames, 10**9) == 'zip'  # recognised by content, not by name
    with pytest.raises(InputError, match='shown.mp4 is empty'):
        check_upload(empty, 10**9, name='shown.mp4')  # messages name the user's file, never the server path


def test_zip_of_frames_is_extracted_flat(tmp_path):
    png = png_bytes(tmp_path)
    z = make_zip(tmp_path / 'clip.zip', {'clip/f2.png': png, 'clip/f10.png': png, 'clip/.DS_Store': b'x',
                                         '__MACOSX/clip/._f2.png': b'x', 'clip/': b''})
    out = extract_frames(z, tmp_path / 'out', max_bytes=10**6)
    assert sorted(p.name for p in out.iterdir()) == ['f10.png', 'f2.png']
    sel, source = select_frames(out, 0, None, None, max_frames=10)
    assert source.names == ['f2', 'f10'] and sel.frames == 2


@pytest.mark.parametrize('entries,links,message', [
    ({'../evil.png': b'x'}, (), "'../evil.png' points outside the zip's folder: refused"),
    ({'clip/../../evil.png': b'x'}, (), 'points outside'),
    ({'/abs/evil.png': b'x'}, (), 'points outside'),
    ({'C:/evil.png': b'x'}, (), 'points outside'),
    ({'ok.png': None}, ('link.png',), "'link.png' is a link: refused"),
    ({'ok.png': None, 'run.sh': b'rm -rf /'}, (), "holds 'run.sh', which is not an image"),
    ({'a/1.png': None, 'b/2.png': None}, (), 'frames in 2 folders'),
    ({'readme.txt': b'x'}, (), 'which is not an image'),
    ({'.hidden.png': b'x'}, (), 'holds no image file'),
])
def test_bad_zips_are_refused(tmp_path, entries, links, message):
    png = png_bytes(tmp_path)
    z = make_zip(tmp_path / 'bad.zip', {k: png if v is None else v for k, v in entries.items()}, links)
    dest = tmp_path / 'out'
    with pytest.raises(InputError, match=message.replace('(', r'\(').replace(')', r'\)')):
        extract_frames(z, dest, max_bytes=10**6)
    assert not dest.exists()  # nothing extracted
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.zip', 'frame.png']  # nothing written beside it


def test_zip_size_and_count_limits(tmp_path):
    big = make_zip(tmp_path / 'big.zip', {f'f{i}.png': bytes(1000) for i in range(5)})
    with pytest.raises(InputError, match='5 kB of images, over the limit of 4 kB'):
        extract_frames(big, tmp_path / 'a', max_bytes=4000)
    with pytest.raises(InputError, match='holds 5 images, more than 4'):
        extract_frames(big, tmp_path / 'b', max_bytes=10**6, max_files=4)
    # a zip whose headers understate the sizes expands no further than stated, and is refused
    lying = tmp_path / 'lying.zip'
    with zipfile.ZipFile(lying, 'w', zipfile.ZIP_DEFLATED) as zf:
        zf.writestr('f.png', bytes(10_000))
    data = bytearray(lying.read_bytes())
    for sig, offset in ((b'PK\x03\x04', 22), (b'PK\x01\x02', 24)):  # uncompressed size in both headers
        at = data.index(sig) + offset
        data[at:at + 4] = (100).to_bytes(4, 'little')
    lying.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"lying.zip is not a readable zip \(Bad CRC-32 for file 'f.png'\)"):
        extract_frames(lying, tmp_path / 'c', max_bytes=5000)
    assert not (tmp_path / 'c').exists()
    corrupt = tmp_path / 'corrupt.zip'
    corrupt.write_bytes(b'PK\x03\x04' + bytes(100))
    with pytest.raises(InputError, match='not a readable zip'):
        extract_frames(corrupt, tmp_path / 'd', max_bytes=10**6)


def test_frame_cap(test_videos_dir):
    video = test_videos_dir / 'sample_24f_540p.mp4'
    sel, source = select_frames(video, 0, None, None, max_frames=4)  # no end: the first `cap` frames
    assert (sel.frames, sel.total, len(source), sel.describe()) == (4, 24, 4, 'frames 0–3 of 24 (4 frames)')
    sel, source = select_frames(video, 20, None, 3, max_frames=4)
    assert source.names == ['000020', '000021', '000022']
    sel, _ = select_frames(video, 22, 0, None, max_frames=4)  # end 0 = none; only 2 frames are left
    assert sel.frames == 2
    with pytest.raises(InputError, match='frames 0–9 are 10 frames, more than the cap of 4: choose an end frame of '
                                         'at most 4'):
        select_frames(video, 0, 10, None, max_frames=4)
    with pytest.raises(InputError, match='more than the cap of 2'):
        select_frames(video, 5, 8, 2, max_frames=4)
    with pytest.raises(InputError, match=r'between 1 and 4 \(this server'):
        select_frames(video, 0, None, 5, max_frames=4)
    with pytest.raises(InputError, match='fewer than 31 frames'):
        select_frames(video, 30, None, None, max_frames=4)
    with pytest.raises(InputError, match='must be greater than the start frame'):
        select_frames(video, 3, 2, None, max_frames=4)


def test_corrupt_video_is_refused(tmp_path, test_videos_dir):
    bad = tmp_path / 'broken.mp4'
    bad.write_bytes(b'\x00\x00\x00\x18ftypmp42' + os.urandom(4000))
    with pytest.raises(InputError, match='cannot read clip.mp4: ') as e:
        select_frames(bad, 0, None, None, max_frames=4, name='clip.mp4')
    assert str(tmp_path) not in str(e.value)


def test_sessions_have_own_folders_removed_on_close_and_when_idle(tmp_path):
    closed: list[str] = []
    busy = {'b'}
    sessions = Sessions(tmp_path / 'root', ttl=3600, on_close=closed.append, busy=lambda k: k in busy)
    a, b = sessions.get('a'), sessions.get('b')
    assert a.folder != b.folder and a.folder.parent == b.folder.parent == tmp_path / 'root'
    assert sessions.get('a') is a
    upload = a.new_upload()
    (upload / 'x.mp4').write_bytes(b'1')
    sessions.close('a')
    assert closed == ['a'] and not a.folder.exists() and b.folder.exists()
    sessions.ttl = 0.0
    time.sleep(0.01)
    assert sessions.sweep() == []  # b is idle but its job runs
    busy.clear()
    assert sessions.sweep() == ['b'] and not b.folder.exists() and len(sessions) == 0
    assert list((tmp_path / 'root').iterdir()) == []


def test_a_new_upload_replaces_the_previous_input(tmp_path):
    s = Sessions(tmp_path, ttl=60).get('k')
    first = s.new_upload()
    (first / 'a.mp4').write_bytes(b'1')
    second = s.new_upload()
    assert not first.exists() and second.exists() and second != first


def test_worker_stops_the_job_of_its_owner_only():
    worker = Worker('test')
    started, steps = threading.Event(), []

    def job():
        started.set()
        while True:  # a long job: Python code between (short) native calls, as the sampling loops are
            steps.append(1)
            time.sleep(0.01)

    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(pytest.raises(Cancelled, worker.run, 'alice', job)))
    thread.start()
    assert started.wait(30)
    assert worker.busy('alice') and not worker.busy('bob')
    assert worker.stop('bob') is False
    assert worker.stop('alice') is True
    thread.join(30)
    assert not thread.is_alive() and outcome  # run() raised Cancelled
    n = len(steps)
    time.sleep(0.1)
    assert len(steps) == n  # the work has stopped
    assert worker.stop('alice') is False  # nothing running
    assert worker.run('alice', lambda: 42) == 42  # the worker goes on with the next job
    worker.shutdown()


def test_parse_scales_and_safe_names():
    assert parse_scales(0.3, '-0.3, 0.5 0.3') == [0.3, -0.3, 0.5]
    assert parse_scales(0.3, '') == [0.3]
    with pytest.raises(InputError, match="'abc' is not a number"):
        parse_scales(0.3, '0.1, abc')
    with pytest.raises(InputError, match='out of range'):
        parse_scales(0.3, '1e9')
    assert safe_name('../../etc/passwd') == 'passwd'
    assert safe_name('my clip (1).MP4') == 'my_clip_1.mp4'
    assert safe_name('..') == 'upload'


def test_worker_runs_one_job_at_a_time():
    worker, running, peak, lock = Worker('test'), [0], [0], threading.Lock()

    def job():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return threading.get_ident()

    threads = [threading.Thread(target=lambda k=k: worker.run(f'user{k}', job)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak[0] == 1
    worker.shutdown()
