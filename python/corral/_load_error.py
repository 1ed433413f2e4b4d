"""The app a worker serves under --reload when the app's code cannot be
loaded, as gunicorn's reloader does: every request gets 500 with the error,
and the next change to the code loads it again."""


def app_for(message: str):
    body = (
        "The application could not be loaded; corral --reload loads it again once its code changes.\n\n"
        + message
        + "\n"
    ).encode("utf-8", "replace")

    def application(environ, start_response):
        start_response(
            "500 Internal Server Error",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return application
