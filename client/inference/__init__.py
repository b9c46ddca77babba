"""Using the site's model at the hospital: prediction, operating point, saliency, export, model card.

Everything here runs at the site and sends nothing anywhere (``fedtl-hospital predict`` and
``fedtl-hospital export`` work with the network down).
"""
