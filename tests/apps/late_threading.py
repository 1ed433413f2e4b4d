"""An app that imports `threading` only when its first request comes, as Flask
and Django do when the app module loads them lazily: the module is then first
imported in a serving thread, which Python takes for the main thread."""


def application(environ, start_response):
    import threading

    start_response("200 OK", [("Content-Type", "text/plain")])
    return [threading.current_thread().name.encode()]
