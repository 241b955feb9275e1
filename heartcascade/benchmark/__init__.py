"""``hc_benchmark``: speed and memory of preprocessing, loading, training and prediction (JSON lines).

Modules: :mod:`.runner` (the command's flow), :mod:`.sections` (the measurements, one worker process
each, :mod:`.worker`), :mod:`.data` (benchmark datasets), :mod:`.memory` (peak RSS / GPU memory),
:mod:`.roi_patch` and :mod:`.predict_child` (prediction with the ROI a trained Net1 would give),
:mod:`.nnunet_compare` (nnU-Net v2 as a peer). See documentation/benchmarks.md.
"""
