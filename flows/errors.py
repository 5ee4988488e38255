"""The pipeline's own errors: light to import, so every entry point can name them."""


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


class RegistrationError(RuntimeError):
    """A finished, evaluated model could not be registered; its training run is left as it was."""
