"""The editing cache: entries written atomically, best-effort, listed and cleared by `python -m editing.cache`."""
from __future__ import annotations

import os
import time

import torch

from editing.cache import Cache, cache_entries, main


def test_list_and_clear(tmp_path, capsys):
    cache = Cache(tmp_path / 'c')
    cache.put('align', 'a1', {'x': torch.zeros(10)}, {'source': 'clip_a.mp4'})
    cache.put('encode', 'e1', {'x': torch.zeros(1000)}, {'source': 'clip_a.mp4', 'T': 100})
    partial = cache.partial_dir('render', 'r1')
    partial.mkdir(parents=True)
    torch.save({'index': torch.arange(2), 'out': torch.zeros(2, 3)}, partial / '0000000-1.pt')
    old = cache.partial_dir('encode', 'e0')  # the pieces of an inversion interrupted long ago
    old.mkdir()
    (old / '0000000-1.pt').write_bytes(b'x' * 100)
    past = time.time() - 10 * 86400
    os.utime(old / '0000000-1.pt', (past, past))

    kinds = sorted(e['kind'] for e in cache_entries(tmp_path / 'c'))
    assert kinds == ['align', 'encode', 'partial-encode', 'partial-render']
    assert main(['--cache_dir', str(tmp_path / 'c')]) == 0
    out = capsys.readouterr().out
    assert '4 entries' in out and 'clip_a.mp4' in out and len(list((tmp_path / 'c').iterdir())) == 4
    main(['--cache_dir', str(tmp_path / 'c'), '--clear', '--older_than', '5'])
    assert not old.exists() and partial.exists()
    main(['--cache_dir', str(tmp_path / 'c'), '--clear', '--partial'])
    assert not partial.exists() and cache.get('encode', 'e1') is not None
    main(['--cache_dir', str(tmp_path / 'c'), '--clear'])
    assert cache.get('align', 'a1') is None and list((tmp_path / 'c').iterdir()) == []
