"""Pure tensor math shared by training, export and the server.

Modules: `paths` (Gaussian paths and parameterisation conversions), `solvers` (ODE and SDE
steps and drivers), `field` (network -> velocity function, guidance), `likelihood` (exact and
Hutchinson divergences, log-likelihoods), `reference` (closed-form fields), `metrics`
(sample quality and memorization). flows/ imports only torch and the standard library.
"""
