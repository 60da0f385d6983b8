# Install the apport exception handler if available.
try:
    import apport_python_hook
except ImportError:
    pass
else:
    apport_python_hook.install()

# Since 3.11.4: report unclosed files and sockets.
import warnings

warnings.filterwarnings("default", category=ResourceWarning)
