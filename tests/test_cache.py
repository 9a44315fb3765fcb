"""The editing cache: chunked on-disk arrays, entries committed atomically, best-effort, listed and cleared by
`python -m editing.cache`."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from editing.cache import Arrays, Cache, cache_entries, main


def test_arrays_fill_chunk_by_chunk_and_resume(tmp_path):
    a = Arrays(tmp_path / 'a')
    a.create('x', (5, 2), np.float64)
    assert a.done('x', 5).tolist() == [False] * 5 and 'x.done' not in a  # reading marks makes none
    a.begin('x', 5)
    a.write('x', np.array([1, 3]), np.ones((2, 2)))
    a.mark('x', np.array([1, 3]))
    a.create('x', (5, 2), np.float64)  # resuming: the same shape and dtype keep what is there
    assert a.read('x')[:, 0].tolist() == [0, 1, 0, 1, 0] and a.done('x', 5).tolist() == [False, True, False, True, False]
    a.create('x', (6, 2), np.float64)  # another shape starts over
    assert not a.read('x').any()
    a.put('small', np.arange(3))
    assert a.read('small', slice(1, 3)).tolist() == [1, 2] and a.shape('small') == (3,)


def test_entries_commit_and_list_and_clear(tmp_path, capsys):
    cache = Cache(tmp_path / 'c')
    e = cache.entry('align', 'a1')
    assert not e.complete and not e.resumed
    e.arrays.put('quads', np.zeros((10, 4, 2)))
    assert cache.entry('align', 'a1').resumed  # an unfinished entry is found again, under partial-
    e.commit({'source': 'clip_a.mp4'})
    again = cache.entry('align', 'a1')
    assert again.complete and again.arrays.read('quads').shape == (10, 4, 2)
    cache.entry('encode', 'e1').arrays.put('x_T', np.zeros(1000))
    cache.entry('encode', 'e1').commit({'source': 'clip_a.mp4', 'T': 100})
    with cache.filling('render', 'r1'):  # (leaves its lock file, removed with the entry)
        cache.entry('render', 'r1').arrays.put('render', np.zeros(10, np.uint8))
    old = cache.entry('encode', 'e0')  # an inversion interrupted long ago
    old.arrays.put('x_T', np.zeros(100))
    past = time.time() - 10 * 86400
    os.utime(old.arrays.folder / 'x_T.npy', (past, past))

    kinds = sorted(e['kind'] for e in cache_entries(tmp_path / 'c'))
    assert kinds == ['align', 'encode', 'partial-encode', 'partial-render']
    assert main(['--cache_dir', str(tmp_path / 'c')]) == 0
    out = capsys.readouterr().out
    assert '4 entries' in out and 'clip_a.mp4' in out
    main(['--cache_dir', str(tmp_path / 'c'), '--clear', '--older_than', '5'])
    assert not old.arrays.folder.exists() and cache.entry('render', 'r1').resumed
    main(['--cache_dir', str(tmp_path / 'c'), '--clear', '--partial'])
    assert not cache.entry('render', 'r1').resumed and cache.entry('encode', 'e1').complete
    assert not (tmp_path / 'c' / '.locks' / 'render-r1.lock').exists()
    main(['--cache_dir', str(tmp_path / 'c'), '--clear'])
    assert [p.name for p in (tmp_path / 'c').iterdir()] == ['.locks'] and not any((tmp_path / 'c' / '.locks').iterdir())


def test_unwritable_or_disabled_cache_works_from_a_scratch_folder(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    with pytest.warns(UserWarning, match='cannot write the cache'):
        cache = Cache(blocker / 'cache')
    assert not cache.enabled
    e = cache.entry('encode', 'k')
    e.arrays.put('x', np.ones(3))
    e.commit({})
    scratch = cache.folder
    assert cache.entry('encode', 'k').complete and scratch != blocker
    cache.close()
    assert not scratch.exists() and blocker.read_text() == 'x'
