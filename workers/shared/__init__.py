"""What every job kind uses: model loading and placement, the worker's cache, data, files, the hub, the model card,
the architecture reader.
"""
