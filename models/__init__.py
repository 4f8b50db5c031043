"""Networks (plain ``nn.Module``), their losses and the LightningModules.

* :mod:`models.airpi` - :class:`~models.airpi.AIRPINet` (paper 002)
* :mod:`models.chang_unet` - :class:`~models.chang_unet.ChangUNet` (paper 001)
* :mod:`models.ptychonn` - :class:`~models.ptychonn.PtychoNN` (paper 004)
* :mod:`models.cgrdn` - :class:`~models.cgrdn.CGRDN`, :class:`~models.cgrdn.PatchDiscriminator` (thesis ch.2)
* :mod:`models.losses` - the training losses of all four
* :mod:`models.lightning` - ``AIRPILightning``, ``ChangLightning``, ``PtychoNNLightning``, ``CGRDNLightning``
  (batch contracts and logged metric names in its docstring); configs in ``conf/model/``.

Submodules are imported explicitly (``from models.airpi import AIRPINet``) so that importing a network
does not import Lightning.
"""
