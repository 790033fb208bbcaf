"""The sample marketplace: schema creation, deterministic sample data, live traffic.

Used by ``ct1-cdc setup --sample-data``, the demo, the tests and the benchmarks.  The
same seed always produces the same rows (timestamps aside, which are ``now()``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

SCHEMA_FILE = Path(__file__).resolve().parent / "marketplace.sql"
Conn = psycopg.Connection[tuple[Any, ...]]

FIRST = [
    "Ana",
    "Bruno",
    "Chloé",
    "Dmitri",
    "Eva",
    "Farid",
    "Grace",
    "Hiro",
    "Inès",
    "João",
    "Kofi",
    "Lena",
    "Mateo",
    "Nia",
    "Oskar",
    "Priya",
    "Quinn",
    "Rosa",
    "Søren",
    "Yuki",
]
LAST = [
    "Silva",
    "Müller",
    "Okafor",
    "Nakamura",
    "García",
    "Novak",
    "Haddad",
    "Kim",
    "Rossi",
    "Andersen",
    "Dubois",
    "Kowalski",
    "Zhang",
    "Singh",
    "O'Brien",
]
WORDS = [
    "Oak",
    "Linen",
    "Copper",
    "Ceramic",
    "Wool",
    "Bamboo",
    "Glass",
    "Leather",
    "Steel",
    "Cotton",
    "Walnut",
    "Marble",
]
THINGS = [
    "Lamp",
    "Mug",
    "Scarf",
    "Bowl",
    "Chair",
    "Notebook",
    "Backpack",
    "Vase",
    "Candle",
    "Blanket",
    "Kettle",
    "Planter",
]
CATEGORIES = ["Home", "Kitchen", "Fashion", "Garden", "Stationery", "Outdoors"]
CITIES = [
    ("Lisbon", "PT"),
    ("Berlin", "DE"),
    ("Lagos", "NG"),
    ("Osaka", "JP"),
    ("Austin", "US"),
    ("Lyon", "FR"),
    ("Kraków", "PL"),
    ("Toronto", "CA"),
]
CARRIERS = ["UPS", "DHL", "FedEx", "USPS"]


def create_schema(conn: Conn) -> None:
    """Create the sample tables if they are missing (idempotent)."""
    conn.execute(SCHEMA_FILE.read_text(encoding="utf-8"))


def has_schema(conn: Conn) -> bool:
    """Every sample table is there (an older sample database lacks ``review_votes``;
    :func:`create_schema` adds what is missing)."""
    row = conn.execute(
        "SELECT to_regclass('public.orders') IS NOT NULL AND to_regclass('public.review_votes') IS NOT NULL"
    ).fetchone()
    return bool(row and row[0])


def tables_with_rows(conn: Conn) -> list[str]:
    """The sample's main tables that exist and hold rows: sample data goes only into a
    database without them, never beside a real marketplace's rows."""
    found = []
    for table in ("users", "shops", "products", "orders"):
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"public.{table}",)).fetchone()
        if row and row[0]:
            query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier("public", table))
            held = conn.execute(query).fetchone()
            if held and held[0]:
                found.append(f"public.{table}")
    return found


@dataclass
class Volume:
    customers: int = 200
    sellers: int = 10
    products: int = 300
    orders: int = 500
    reviews: int = 300
    views: int = 1000
    carts: int = 100


def _scalar(conn: Conn, query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def _money(rng: random.Random, low: float, high: float) -> Decimal:
    return Decimal(f"{rng.uniform(low, high):.2f}")


def generate(
    conn: Conn,
    seed: int = 1,
    volume: Volume | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Insert a deterministic marketplace; returns the row count per table."""
    v = volume or Volume()
    rng = random.Random(seed)
    note = progress or (lambda table, n: None)
    counts: dict[str, int] = {}
    with conn.transaction():
        base = _scalar(conn, "SELECT coalesce(max(id), 0) FROM users")
        users = [
            (
                f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                f"user{base + i}.{seed}@example.com",
                f"$2y$10${rng.getrandbits(128):032x}",
                "seller" if i < v.sellers else "customer",
            )
            for i in range(v.customers + v.sellers)
        ]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO users (name, email, password, role) VALUES (%s, %s, %s, %s)", users)
        ids = [
            r[0] for r in conn.execute("SELECT id FROM users WHERE id > %s ORDER BY id", (base,)).fetchall()
        ]
        seller_ids, customer_ids = ids[: v.sellers], ids[v.sellers :]
        counts["users"] = len(ids)
        note("users", len(ids))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO addresses (user_id, line1, city, postal_code, country, is_default)"
                " VALUES (%s, %s, %s, %s, %s, true)",
                [
                    (
                        u,
                        f"{rng.randint(1, 999)} {rng.choice(WORDS)} Street",
                        *_city(rng),
                    )
                    for u in customer_ids
                ],
            )
            cur.executemany(
                "INSERT INTO categories (name, slug) VALUES (%s, %s) ON CONFLICT (slug) DO NOTHING",
                [(c, c.lower()) for c in CATEGORIES],
            )
            cur.executemany(
                "INSERT INTO shops (user_id, name, slug) VALUES (%s, %s, %s)",
                [(s, f"{rng.choice(WORDS)} & Co {s}", f"shop-{s}-{seed}") for s in seller_ids],
            )
        shops = conn.execute(
            "SELECT id, user_id FROM shops WHERE user_id = ANY(%s) ORDER BY id", (seller_ids,)
        ).fetchall()
        cats = [r[0] for r in conn.execute("SELECT id FROM categories ORDER BY id").fetchall()]
        products = []
        for i in range(v.products):
            name = f"{rng.choice(WORDS)} {rng.choice(THINGS)}"
            products.append(
                (
                    rng.choice(shops)[0],
                    rng.choice(cats),
                    name,
                    f"{name.lower().replace(' ', '-')}-{i}",
                    _money(rng, 5, 400),
                    rng.choice([0, 3, 10, 50, 120]),
                    rng.choice(["active"] * 8 + ["draft", "inactive"]),
                    f"{name} | Sample Market",
                    f"Buy the {name} online.",
                )
            )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO products (shop_id, category_id, name, slug, price, stock, status,"
                " meta_title, meta_description) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " RETURNING id, price, shop_id",
                products,
                returning=True,
            )
            product_rows: list[tuple[Any, ...]] = []
            while True:
                product_rows.extend(cur.fetchall())
                if not cur.nextset():
                    break
        counts["products"] = len(product_rows)
        note("products", len(product_rows))
        shop_owner: dict[int, int] = dict(shops)
        for _ in range(v.orders):
            insert_order(conn, rng, customer_ids, product_rows, shop_owner)
        counts["orders"] = v.orders
        note("orders", v.orders)
        review_base = _scalar(conn, "SELECT coalesce(max(id), 0) FROM reviews")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO reviews (product_id, user_id, rating, comment, status)"
                " VALUES (%s, %s, %s, %s, %s)",
                [
                    (
                        rng.choice(product_rows)[0],
                        rng.choice(customer_ids),
                        rng.randint(1, 5),
                        rng.choice(["Great!", "Très bien", "Not as pictured", "素晴らしい", "Okay"]),
                        rng.choice(["approved", "approved", "pending", "rejected"]),
                    )
                    for _ in range(v.reviews)
                ],
            )
            cur.executemany(
                "INSERT INTO product_views (product_id, user_id, session_id) VALUES (%s, %s, %s)",
                [
                    (
                        rng.choice(product_rows)[0],
                        rng.choice([*customer_ids, None]),
                        f"s{rng.getrandbits(40):x}",
                    )
                    for _ in range(v.views)
                ],
            )
        counts["reviews"] = v.reviews
        counts["product_views"] = v.views
        for _ in range(v.carts):
            add_to_cart(conn, rng, customer_ids, product_rows)
        counts["carts"] = v.carts
        note("carts", v.carts)
        # last, so the rows above stay what they were before votes existed
        counts["review_votes"] = _vote(conn, rng, review_base, customer_ids)
        note("review_votes", counts["review_votes"])
    return counts


def _vote(conn: Conn, rng: random.Random, review_base: int, customer_ids: list[int]) -> int:
    """Helpful / not helpful votes on the new reviews: none to a few each, mostly helpful."""
    reviews = [
        r[0]
        for r in conn.execute("SELECT id FROM reviews WHERE id > %s ORDER BY id", (review_base,)).fetchall()
    ]
    votes = [
        (review, voter, rng.random() < 0.75)
        for review in reviews
        for voter in rng.sample(customer_ids, min(len(customer_ids), rng.choice([0, 0, 1, 2, 3, 5])))
    ]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO review_votes (review_id, user_id, helpful) VALUES (%s, %s, %s)", votes)
    return len(votes)


def _city(rng: random.Random) -> tuple[str, str, str]:
    city, country = rng.choice(CITIES)
    return city, f"{rng.randint(10000, 99999)}", country


def insert_order(
    conn: Conn,
    rng: random.Random,
    customer_ids: list[int],
    products: list[tuple[Any, ...]],
    shop_owner: dict[int, int],
) -> int:
    product_id, price, shop_id = rng.choice(products)
    quantity = rng.randint(1, 3)
    subtotal = price * quantity
    shipping = Decimal("4.99")
    total = subtotal + shipping
    city, postal, country = _city(rng)
    row = conn.execute(
        "INSERT INTO orders (user_id, seller_id, shop_id, payment_method, subtotal,"
        " shipping_total, total, shipping_address) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        " RETURNING id",
        (
            rng.choice(customer_ids),
            shop_owner.get(shop_id),
            shop_id,
            rng.choice(["card", "paypal", "bank_transfer"]),
            subtotal,
            shipping,
            total,
            Jsonb({"city": city, "postal_code": postal, "country": country}),
        ),
    ).fetchone()
    assert row is not None
    conn.execute(
        "INSERT INTO order_items (order_id, product_id, quantity, price, total) VALUES (%s, %s, %s, %s, %s)",
        (row[0], product_id, quantity, price, subtotal),
    )
    return int(row[0])


def add_to_cart(
    conn: Conn, rng: random.Random, customer_ids: list[int], products: list[tuple[Any, ...]]
) -> None:
    cart = conn.execute(
        "INSERT INTO carts (user_id) VALUES (%s) RETURNING id", (rng.choice(customer_ids),)
    ).fetchone()
    assert cart is not None
    product_id, price, _ = rng.choice(products)
    conn.execute(
        "INSERT INTO cart_items (cart_id, product_id, quantity, price) VALUES (%s, %s, %s, %s)",
        (cart[0], product_id, rng.randint(1, 2), price),
    )


class Traffic:
    """Live marketplace activity, one small transaction per :meth:`step` (for the demo)."""

    def __init__(self, conn: Conn, seed: int = 7) -> None:
        self.conn = conn
        self.rng = random.Random(seed)
        self.customers = [
            r[0] for r in conn.execute("SELECT id FROM users WHERE role = 'customer' ORDER BY id").fetchall()
        ]
        self.products = conn.execute("SELECT id, price, shop_id FROM products ORDER BY id").fetchall()
        self.shop_owner: dict[int, int] = dict(conn.execute("SELECT id, user_id FROM shops").fetchall())

    def step(self) -> str:
        rng, conn = self.rng, self.conn
        action = rng.choice(
            [
                "order",
                "order",
                "advance",
                "advance",
                "pay",
                "view",
                "view",
                "cart",
                "checkout",
                "review",
                "customer",
                "profile",
                "moderate",
            ]
        )
        with conn.transaction():
            if action == "order":
                insert_order(conn, rng, self.customers, self.products, self.shop_owner)
            elif action == "advance":
                conn.execute(
                    "UPDATE orders SET status = CASE status WHEN 'pending' THEN 'processing'"
                    " WHEN 'processing' THEN 'shipped' ELSE 'delivered' END,"
                    " tracking_number = coalesce(tracking_number, %s), shipping_carrier ="
                    " coalesce(shipping_carrier, %s), updated_at = now()"
                    " WHERE id = (SELECT id FROM orders WHERE status IN"
                    " ('pending', 'processing', 'shipped') ORDER BY random() LIMIT 1)",
                    (f"TRK{rng.getrandbits(40):X}", rng.choice(CARRIERS)),
                )
            elif action == "pay":
                conn.execute(
                    "UPDATE orders SET payment_status = 'paid', updated_at = now() WHERE id ="
                    " (SELECT id FROM orders WHERE payment_status = 'pending' ORDER BY random() LIMIT 1)"
                )
            elif action == "view":
                conn.execute(
                    "INSERT INTO product_views (product_id, user_id) VALUES (%s, %s)",
                    (rng.choice(self.products)[0], rng.choice(self.customers)),
                )
            elif action == "cart":
                add_to_cart(conn, rng, self.customers, self.products)
            elif action == "checkout":  # a cart becomes an order: not abandoned
                cart = conn.execute(
                    "UPDATE carts SET status = 'converted', updated_at = now() WHERE id ="
                    " (SELECT id FROM carts WHERE status = 'active' ORDER BY random() LIMIT 1) RETURNING user_id"
                ).fetchone()
                if cart is not None and cart[0] is not None:
                    insert_order(conn, rng, [cart[0]], self.products, self.shop_owner)
            elif action == "review":
                conn.execute(
                    "INSERT INTO reviews (product_id, user_id, rating, comment) VALUES (%s, %s, %s, %s)",
                    (
                        rng.choice(self.products)[0],
                        rng.choice(self.customers),
                        rng.randint(1, 5),
                        rng.choice(["Love it", "Meh", "Arrived broken", "5 stars ★★★★★"]),
                    ),
                )
            elif action == "profile":
                conn.execute(
                    "UPDATE users SET phone = %s, email_verified_at = coalesce(email_verified_at, now()),"
                    " updated_at = now() WHERE id = %s",
                    (f"+1555{rng.randint(0, 9999999):07d}", rng.choice(self.customers)),
                )
            elif action == "moderate":
                conn.execute(
                    "UPDATE reviews SET status = 'approved', updated_at = now() WHERE id ="
                    " (SELECT id FROM reviews WHERE status = 'pending' ORDER BY random() LIMIT 1)"
                )
            else:
                row = conn.execute(
                    "INSERT INTO users (name, email, password) VALUES (%s, %s, %s) RETURNING id",
                    (
                        f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                        f"live{rng.getrandbits(48):x}@example.com",
                        "$2y$10$secret",
                    ),
                ).fetchone()
                assert row is not None
                self.customers.append(int(row[0]))
        return action
