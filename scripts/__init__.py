"""Brain-age prediction with a semi-supervised diffusion autoencoder (Ijishakin et al.).

The package the bundle's configs import: one module per concern (see ``docs/README.md``).
"""
