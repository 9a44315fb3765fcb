"""Face video editing: encode a video once, move its identity, render the edit, paste it back.

The API is `editing.api` (`Editor`, `EncodedVideo`, `AlignedVideo`, `Direction`, `Rendered`); the scripts
editing_classifier.py and editing_CLIP.py are thin callers of it. `from editing import Editor` works without importing torch until used.
"""


def __getattr__(name: str):
    if name in ('Editor', 'EncodedVideo', 'AlignedVideo', 'Direction', 'Rendered', 'EditError'):
        from editing import api

        return getattr(api, name)
    raise AttributeError(name)
