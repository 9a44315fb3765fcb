"""Face video editing: encode a video once, move its identity, render the edit, paste it back."""
