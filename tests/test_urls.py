from eventcast._urls import pop_option, redact_password


def test_pop_option_takes_the_option_off_and_keeps_the_rest():
    url, value = pop_option("redis://h:6379/0?prefix=app&ssl_cert_reqs=none&prefix=last", "prefix")
    assert value == "last"
    assert url == "redis://h:6379/0?ssl_cert_reqs=none"


def test_pop_option_absent_and_blank():
    assert pop_option("nats://h:4222", "prefix") == ("nats://h:4222", None)
    assert pop_option("postgresql://u@h/db?schema=", "schema") == ("postgresql://u@h/db", "")


def test_redact_password_masks_only_the_password():
    assert redact_password("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_password("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_password("redis://:pw@h/0", "**") == "redis://:**@h/0"
    assert redact_password("http://[bad") == "http://[bad"
