"""An app made by a factory (`factory_app:create()`, with arguments too), and a plain `application`."""


def _make(greeting):
    def app(environ, start_response):
        body = greeting.encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def create(greeting="made by the factory", *, suffix=""):
    return _make(greeting + suffix)


application = _make("plain application")
