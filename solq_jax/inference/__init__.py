"""Inference: post-processing, COCO evaluation, prediction on image files, overlays.

    postprocess.Postprocessor   model outputs -> per-image detections (top-k, boxes, pasted masks)
    coco_eval                   detections -> COCO result records, COCOeval, result files
    evaluate                    a model over the eval split (eval.py; `make_evaluation` for train.py)
    predict                     image files -> PNG overlays and detections.json (predict.py)
    visualize                   drawing

Nothing below `solq_jax.inference` imports it: training receives evaluation as a callable.
"""
