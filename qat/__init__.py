"""The training-time quantizers the model carries: ``qat.quantizer`` (fake-quantize each linear's
input to ``qat.bits`` with learned clips, on ``kernels``), ``qat.kurtosis`` (the penalty on the
kurtosis of layer outputs) and ``qat.config`` (their config sections). Between ``model`` and
``pretrain`` in the import order; the post-training tools (``quant``) read what they trained.
Nothing is imported here, so ``qat.config`` loads without torch."""
