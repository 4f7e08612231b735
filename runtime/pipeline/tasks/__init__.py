"""Task postprocessors beyond segmentation: classification, detection, image, anomaly, registration.

Each turns raw model outputs into results in the frame's own pixel grid and
units; ``edgescope.runtime.pipeline.postprocess`` dispatches on the manifest's task.
"""
