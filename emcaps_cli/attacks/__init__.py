"""Adversarial attacks of section 6 (Fig. 3): FGSM (Goodfellow et al. 2014) and the Basic
Iterative Method (Kurakin et al. 2016), untargeted and targeted, white-box or transferred from a
source model (black box), plus the gradient diagnostics the paper uses to rule out gradient
masking (Brendel & Bethge 2017).

Units: ε and the BIM step size are in standardised-image units (one unit = one standard deviation
of that image's pixels). Test images are standardised per image and centre-cropped exactly as in
`emcaps evaluate`; the perturbation is added to that standardised 32x32 crop, which is what the
model sees. Nothing is clipped: a standardised image has no fixed pixel range.

The attacked loss is summed over the images of a batch, so an image's gradient does not depend on
the batch size; the spread loss uses its final margin 0.9.

methods.py: FGSM and BIM; protocol.py: settings and runs; the figure: emcaps_cli/plots.py.
"""
