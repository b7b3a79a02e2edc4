"""The data layer: scan → manifest (+ label map) → split → images → loaders."""
