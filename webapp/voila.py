# The Voilà configuration of the web app. Voilà reads `voila.py` from the folders in `Voila.config_file_paths`, so
# the README's command points it here (from the project folder):
#
#     .venv/bin/voila --Voila.config_file_paths=webapp webapp/explorer.ipynb
#
# `explorer.ipynb` is the page: notebook 03's explorer on the same atlas, without the figures and without the cell
# that loads the model (Voilà sends a page only after its last cell has run). Notebook 03 can be served the same way.
#
# (The file is not at the project's root: a `voila.py` there would shadow the voila package for
# `python -m voila`.) Options given on the command line override these.
#
# Every page view starts a kernel; these settings make sure each one goes away again:
# - When its page closes, the page sends a shutdown request that jupyter_server checks against the `_xsrf`
#   cookie (XSRF protection stays on). Voilà renders its page without ever setting that cookie, so the request
#   was refused (403) and the kernel lived on. The hook below sets the cookie while the page's headers are still
#   open, before the kernel starts.
# - A page that vanishes without closing (a killed browser, a lost network) leaves an idle kernel with no
#   connection: it is shut down after `cull_idle_timeout` seconds. Kernels with an open page are never culled,
#   however long the reader looks without clicking.
# - On Linux, kernels talk to the server over Unix sockets (IPC) rather than unencrypted TCP on loopback.

import sys

c = get_config()  # noqa: F821 (provided by traitlets when Voilà loads this file)


def set_xsrf_cookie(handler, notebook, cwd):
    """Voilà's prelaunch hook: reading `xsrf_token` makes tornado set the `_xsrf` cookie on this response."""
    handler.xsrf_token
    return None  # the notebook is served unchanged


c.VoilaConfiguration.prelaunch_hook = set_xsrf_cookie

c.MappingKernelManager.cull_idle_timeout = 600  # seconds without activity and without a connected page
c.MappingKernelManager.cull_interval = 60  # seconds between checks
c.MappingKernelManager.cull_connected = False  # an open page keeps its kernel

if sys.platform.startswith("linux"):  # Unix sockets; elsewhere TCP (macOS's long temp paths exceed socket limits)
    c.KernelManager.transport = "ipc"
