"""A database per test, loaded once: the way a user of Dolly's pytest plugin writes it.

The server starts once per run, loads fixtures/shop.sql (50,000 products), and is checkpointed;
every test gets its own clone, with its own URL, so each test can write freely. Run it with
`pytest examples/test_warm_postgres.py` (add `-n 2` with pytest-xdist: workers share the warm
checkpoint).
"""
from pathlib import Path

import dolly.testing

db = dolly.testing.postgres(fixtures=Path(__file__).parent / "fixtures" / "shop.sql")


def order(conn, product: int, quantity: int) -> None:
    conn.execute("INSERT INTO orders (product, quantity) VALUES (%s, %s)", (product, quantity))
    conn.execute("UPDATE products SET stock = stock - %s WHERE id = %s", (quantity, product))


def test_an_order_takes_stock(db):
    with db.connect() as conn:
        order(conn, 7, 3)
        assert conn.execute("SELECT stock FROM products WHERE id = 7").fetchone() == (7,)


def test_every_test_starts_from_the_fixtures(db):
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)
        assert conn.execute("SELECT count(*), sum(stock) FROM products").fetchone() == (50000, 500000)


def test_the_url_is_the_clone_s_own(db):
    assert db.url == f"postgresql://test:test@{db.host}:5432/test"
    assert db.host == db.container.attrs["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
