/* Compiled decoding of wal2json format-version 2 row messages (I, U, D) and of the
 * transactions' edges (B, C).
 *
 * The hot path of capture: one call turns a row message's bytes into a RowChange with
 * the values of cdc.decode's pure-Python decoder (which stays the reference and the
 * fallback: tests hold both to the same results).  Everything unusual is left to it:
 *
 *   decode_row(payload) -> RowChange | Begin | Commit | None
 *
 * returns None for a message that is none of those (or does not start the way wal2json
 * writes one) and raises ValueError for anything it does not take on itself
 * (malformed JSON, a lone surrogate, invalid UTF-8, a missing key); the caller then
 * decodes with the Python path, which gives the precise DecodeError.
 *
 * Column values by type, as cdc.decode does them:
 *   numeric / decimal (any typmod)  a number literal stays its exact text (a str)
 *   timestamp with time zone        "YYYY-MM-DD HH:MM:SS[.ffffff]+00" -> ISO 8601 "...Z";
 *                                   anything else goes to the Python converter
 *   json / jsonb                    the Python converter (the text kept as common.jsontext.JsonText)
 *   smallint integer bigint oid     a number or boolean as JSON says; a quoted value (what
 *   real double precision boolean   wal2json writes for a domain) goes to the Python converter
 *   bytea                           hex text; "\\x..." (a domain's) goes to the Python converter
 *   every other type                str, int, float, bool or None as JSON says
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static PyObject *RowChangeType = NULL; /* cdc.decode.RowChange */
static PyObject *BeginType = NULL;     /* cdc.decode.Begin and Commit: a transaction's edges */
static PyObject *CommitType = NULL;
static PyObject *Fallback = NULL;      /* callable(type: str, value) -> value */
static PyObject *OpInsert, *OpUpdate, *OpDelete;

/* -- a cache of short strings by their raw JSON bytes (column names, table names) ------ */

#define CACHE_SLOTS 1024
#define CACHE_MAX_LEN 64

typedef struct {
    uint64_t hash;
    Py_ssize_t len;
    char bytes[CACHE_MAX_LEN];
    PyObject *value;
} CacheSlot;

static CacheSlot cache[CACHE_SLOTS];

static uint64_t fnv1a(const char *s, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* -- the parser -------------------------------------------------------------------------- */

typedef struct {
    const char *p;
    const char *end;
} Cursor;

static int fail(const char *why) {
    PyErr_SetString(PyExc_ValueError, why);
    return -1;
}

static void skip_ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int expect(Cursor *c, char ch) {
    skip_ws(c);
    if (c->p >= c->end || *c->p != ch)
        return fail("unexpected character");
    c->p++;
    return 0;
}

/* A string's raw content (between the quotes).  *escaped has bit 1 when it holds a
 * backslash and bit 2 when it holds a byte past ASCII (to check as UTF-8 if skipped). */
static int string_span(Cursor *c, const char **start, Py_ssize_t *len, int *escaped) {
    skip_ws(c);
    if (c->p >= c->end || *c->p != '"')
        return fail("expected a string");
    const char *s = ++c->p;
    int esc = 0, high = 0;
    while (c->p < c->end) {
        unsigned char ch = (unsigned char)*c->p;
        if (ch == '"') {
            *start = s;
            *len = c->p - s;
            *escaped = esc | high;
            c->p++;
            return 0;
        }
        if (ch >= 0x80) {
            high = 2;
            c->p++;
            continue;
        }
        if (ch == '\\') {
            esc = 1;
            c->p += 2;
            continue;
        }
        if (ch < 0x20)
            return fail("control character in a string");
        c->p++;
    }
    return fail("unterminated string");
}

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static long hex4(const char *s, const char *end) {
    if (end - s < 4) return -1;
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(s[i]);
        if (h < 0) return -1;
        v = (v << 4) | h;
    }
    return v;
}

static char *put_utf8(char *out, long cp) {
    if (cp < 0x80) {
        *out++ = (char)cp;
    } else if (cp < 0x800) {
        *out++ = (char)(0xC0 | (cp >> 6));
        *out++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *out++ = (char)(0xE0 | (cp >> 12));
        *out++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *out++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *out++ = (char)(0xF0 | (cp >> 18));
        *out++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *out++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *out++ = (char)(0x80 | (cp & 0x3F));
    }
    return out;
}

/* The str of a string's raw content, escapes resolved (strict UTF-8, no lone surrogate). */
static PyObject *string_value(const char *s, Py_ssize_t n, int escaped) {
    if (!(escaped & 1))
        return PyUnicode_DecodeUTF8(s, n, NULL);
    char *buf = PyMem_Malloc(n > 0 ? (size_t)n : 1); /* unescaping never lengthens */
    if (buf == NULL)
        return PyErr_NoMemory();
    char *out = buf;
    const char *end = s + n;
    while (s < end) {
        if (*s != '\\') {
            *out++ = *s++;
            continue;
        }
        s++;
        if (s >= end) goto bad;
        char e = *s++;
        switch (e) {
        case '"': *out++ = '"'; break;
        case '\\': *out++ = '\\'; break;
        case '/': *out++ = '/'; break;
        case 'b': *out++ = '\b'; break;
        case 'f': *out++ = '\f'; break;
        case 'n': *out++ = '\n'; break;
        case 'r': *out++ = '\r'; break;
        case 't': *out++ = '\t'; break;
        case 'u': {
            long cp = hex4(s, end);
            if (cp < 0) goto bad;
            s += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (end - s < 6 || s[0] != '\\' || s[1] != 'u') goto bad;
                long lo = hex4(s + 2, end);
                if (lo < 0xDC00 || lo > 0xDFFF) goto bad;
                s += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                goto bad;
            }
            out = put_utf8(out, cp);
            break;
        }
        default:
            goto bad;
        }
    }
    PyObject *result = PyUnicode_DecodeUTF8(buf, out - buf, NULL);
    PyMem_Free(buf);
    return result;
bad:
    PyMem_Free(buf);
    fail("escape sequence left to the Python decoder");
    return NULL;
}

/* A short string through the cache: the same raw bytes give the same str object. */
static PyObject *cached_string(const char *s, Py_ssize_t n, int escaped) {
    if (n > CACHE_MAX_LEN)
        return string_value(s, n, escaped);
    uint64_t h = fnv1a(s, n);
    CacheSlot *slot = &cache[h % CACHE_SLOTS];
    if (slot->value != NULL && slot->hash == h && slot->len == n && memcmp(slot->bytes, s, (size_t)n) == 0) {
        Py_INCREF(slot->value);
        return slot->value;
    }
    PyObject *value = string_value(s, n, escaped);
    if (value == NULL)
        return NULL;
    Py_XDECREF(slot->value);
    Py_INCREF(value);
    slot->value = value;
    slot->hash = h;
    slot->len = n;
    memcpy(slot->bytes, s, (size_t)n);
    return value;
}

/* A number literal's span, checked against JSON's grammar; *integral when it has no
 * fraction and no exponent. */
static int number_span(Cursor *c, const char **start, Py_ssize_t *len, int *integral) {
    const char *s = c->p, *p = c->p, *end = c->end;
    int whole = 1;
    if (p < end && *p == '-') p++;
    if (p >= end) return fail("bad number");
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
    } else {
        return fail("bad number");
    }
    if (p < end && *p == '.') {
        whole = 0;
        p++;
        if (p >= end || *p < '0' || *p > '9') return fail("bad number");
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        whole = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return fail("bad number");
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    *start = s;
    *len = p - s;
    *integral = whole;
    c->p = p;
    return 0;
}

static int skip_value(Cursor *c, int depth);

static int skip_container(Cursor *c, char close, int depth) {
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 0;
    }
    for (;;) {
        if (close == '}') {
            const char *k;
            Py_ssize_t kl;
            int ke;
            if (string_span(c, &k, &kl, &ke) < 0 || expect(c, ':') < 0) return -1;
            if (ke) return fail("escaped key left to the Python decoder");
        }
        if (skip_value(c, depth + 1) < 0) return -1;
        skip_ws(c);
        if (c->p < c->end && *c->p == ',') {
            c->p++;
            continue;
        }
        return expect(c, close);
    }
}

static int skip_value(Cursor *c, int depth) {
    if (depth > 64) return fail("nested too deep");
    skip_ws(c);
    if (c->p >= c->end) return fail("truncated message");
    const char *s;
    Py_ssize_t n;
    int flag;
    switch (*c->p) {
    case '"':
        if (string_span(c, &s, &n, &flag) < 0) return -1;
        if (flag) { /* checked as the Python decoder would: escapes and UTF-8 */
            PyObject *v = string_value(s, n, flag);
            if (v == NULL) return -1;
            Py_DECREF(v);
        }
        return 0;
    case '{': return skip_container(c, '}', depth);
    case '[': return skip_container(c, ']', depth);
    case 't':
        if (c->end - c->p >= 4 && memcmp(c->p, "true", 4) == 0) { c->p += 4; return 0; }
        return fail("bad literal");
    case 'f':
        if (c->end - c->p >= 5 && memcmp(c->p, "false", 5) == 0) { c->p += 5; return 0; }
        return fail("bad literal");
    case 'n':
        if (c->end - c->p >= 4 && memcmp(c->p, "null", 4) == 0) { c->p += 4; return 0; }
        return fail("bad literal");
    default: return number_span(c, &s, &n, &flag);
    }
}

/* -- column values ------------------------------------------------------------------------ */

/* Type kinds; T_NUMERIC + s for numeric(p,s) with p <= 15, whose text always has s decimals.
 * T_UNQUOTED: types wal2json writes as JSON numbers or booleans; a quoted value of one is a
 * domain's (wal2json quotes by the column's own type, include-domain-data-type names the
 * base type).  T_BYTEA: hex; a domain's value keeps Postgres's "\x" prefix. */
enum { T_BYTEA = -7, T_UNQUOTED, T_GENERIC, T_NUMERIC_ODD, T_TIMESTAMPTZ, T_CONVERTED, T_NUMERIC };

static int classify(const char *t, Py_ssize_t n) {
    if (n >= 7 && (memcmp(t, "numeric", 7) == 0 || memcmp(t, "decimal", 7) == 0)) {
        if (n == 7) return T_NUMERIC;
        /* (p) or (p,s) */
        const char *p = t + 7, *end = t + n;
        long precision = 0, scale = 0;
        if (*p++ != '(' || end[-1] != ')') return T_NUMERIC_ODD;
        end--;
        if (p >= end) return T_NUMERIC_ODD;
        while (p < end && *p >= '0' && *p <= '9' && precision < 100000) precision = precision * 10 + (*p++ - '0');
        if (p < end && *p == ',') {
            p++;
            if (p >= end) return T_NUMERIC_ODD;
            while (p < end && *p >= '0' && *p <= '9' && scale < 100000) scale = scale * 10 + (*p++ - '0');
        }
        if (p != end || precision == 0) return T_NUMERIC_ODD;
        return precision > 15 ? T_NUMERIC : T_NUMERIC + 1 + (int)scale;
    }
    switch (n) {
    case 24: return memcmp(t, "timestamp with time zone", 24) == 0 ? T_TIMESTAMPTZ : T_GENERIC;
    case 4:
        if (memcmp(t, "json", 4) == 0) return T_CONVERTED;
        return memcmp(t, "real", 4) == 0 ? T_UNQUOTED : T_GENERIC;
    case 5:
        if (memcmp(t, "jsonb", 5) == 0) return T_CONVERTED;
        return memcmp(t, "bytea", 5) == 0 ? T_BYTEA : T_GENERIC;
    case 7: return memcmp(t, "integer", 7) == 0 || memcmp(t, "boolean", 7) == 0 ? T_UNQUOTED : T_GENERIC;
    case 6: return memcmp(t, "bigint", 6) == 0 ? T_UNQUOTED : T_GENERIC;
    case 8: return memcmp(t, "smallint", 8) == 0 ? T_UNQUOTED : T_GENERIC;
    case 3: return memcmp(t, "oid", 3) == 0 ? T_UNQUOTED : T_GENERIC;
    case 16: return memcmp(t, "double precision", 16) == 0 ? T_UNQUOTED : T_GENERIC;
    default: return T_GENERIC;
    }
}

static int all_digits(const char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}

/* "2026-11-25 15:07:53.877066+00" -> "2026-11-25T15:07:53.877066Z", or NULL (no error set)
 * when the text is not in that form. */
static PyObject *fast_timestamptz(const char *s, Py_ssize_t n) {
    if (n < 22 || s[0] < '0' || s[0] > '9' || s[10] != ' ' || memcmp(s + n - 3, "+00", 3) != 0) return NULL;
    Py_ssize_t body = n - 3;
    char out[32];
    memcpy(out, s, 10);
    out[10] = 'T';
    if (body == 19) {
        memcpy(out + 11, s + 11, 8);
        memcpy(out + 19, ".000000Z", 8);
        return PyUnicode_FromStringAndSize(out, 27);
    }
    if (s[19] != '.' || body < 21 || !all_digits(s + 20, body - 20)) return NULL;
    memcpy(out + 11, s + 11, 8);
    out[19] = '.';
    Py_ssize_t frac = body - 20 > 6 ? 6 : body - 20;
    memcpy(out + 20, s + 20, (size_t)frac);
    for (Py_ssize_t i = frac; i < 6; i++) out[20 + i] = '0';
    out[26] = 'Z';
    return PyUnicode_FromStringAndSize(out, 27);
}

static PyObject *fallback(const char *type, Py_ssize_t tlen, PyObject *value) {
    PyObject *tname = PyUnicode_DecodeUTF8(type, tlen, NULL);
    if (tname == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    PyObject *result = PyObject_CallFunctionObjArgs(Fallback, tname, value, NULL);
    Py_DECREF(tname);
    Py_DECREF(value);
    return result;
}

/* The value at the cursor, converted for its column type. */
static PyObject *column_value(Cursor *c, const char *type, Py_ssize_t tlen, int kind) {
    skip_ws(c);
    if (c->p >= c->end) {
        fail("truncated message");
        return NULL;
    }
    const char *s;
    Py_ssize_t n;
    int flag;
    char ch = *c->p;
    if (ch == '"') {
        if (string_span(c, &s, &n, &flag) < 0) return NULL;
        if (kind == T_TIMESTAMPTZ && !flag) {
            PyObject *iso = fast_timestamptz(s, n);
            if (iso != NULL || PyErr_Occurred()) return iso;
        }
        PyObject *text = string_value(s, n, flag);
        if (text == NULL) return NULL;
        if (kind == T_TIMESTAMPTZ || kind == T_CONVERTED || kind == T_UNQUOTED) return fallback(type, tlen, text);
        if (kind == T_BYTEA && n >= 2 && s[0] == '\\' && s[1] == '\\') return fallback(type, tlen, text);
        return text;
    }
    if (ch == 't' || ch == 'f' || ch == 'n') {
        const char *start = c->p;
        if (skip_value(c, 0) < 0) return NULL;
        PyObject *v = *start == 't' ? Py_True : *start == 'f' ? Py_False : Py_None;
        Py_INCREF(v);
        if (v != Py_None && (kind == T_TIMESTAMPTZ || kind == T_CONVERTED)) return fallback(type, tlen, v);
        return v;
    }
    if (ch == '-' || (ch >= '0' && ch <= '9')) {
        if (number_span(c, &s, &n, &flag) < 0) return NULL;
        if (kind >= T_NUMERIC) {
            if (flag && n >= 2 && s[0] == '-' && s[1] == '0') { /* "-0": Postgres never writes it */
                fail("numeric text left to the Python decoder");
                return NULL;
            }
            if (kind > T_NUMERIC) { /* numeric(p,s), p <= 15: Postgres prints exactly s decimals */
                const char *dot = memchr(s, '.', (size_t)n);
                Py_ssize_t decimals = dot ? n - (dot - s) - 1 : 0;
                if (memchr(s, 'e', (size_t)n) || memchr(s, 'E', (size_t)n) || decimals != kind - T_NUMERIC - 1) {
                    fail("numeric text left to the Python decoder");
                    return NULL;
                }
            }
            return PyUnicode_FromStringAndSize(s, n);
        }
        if (kind == T_NUMERIC_ODD) {
            fail("number of an odd numeric type left to the Python decoder");
            return NULL;
        }
        char buf[64];
        PyObject *v;
        if (n >= (Py_ssize_t)sizeof(buf) || (flag && n - (*s == '-') > 18)) {
            fail("long number left to the Python decoder");
            return NULL;
        }
        memcpy(buf, s, (size_t)n);
        buf[n] = '\0';
        if (flag) {
            v = PyLong_FromString(buf, NULL, 10);
        } else {
            PyObject *text = PyUnicode_FromStringAndSize(s, n);
            if (text == NULL) return NULL;
            v = PyFloat_FromString(text);
            Py_DECREF(text);
            if (v != NULL && !isfinite(PyFloat_AS_DOUBLE(v))) {
                Py_DECREF(v);
                fail("number past a double's range");
                return NULL;
            }
        }
        if (v != NULL && (kind == T_TIMESTAMPTZ || kind == T_CONVERTED)) return fallback(type, tlen, v);
        return v;
    }
    fail("a column value must be a string, number, boolean or null");
    return NULL;
}

#define KEY_IS(k, n, lit) ((n) == (Py_ssize_t)sizeof(lit) - 1 && memcmp((k), (lit), sizeof(lit) - 1) == 0)

/* -- walking objects and arrays ---------------------------------------------------------- */

/* The next member of an object whose '{' is consumed: 1 with its key (the cursor then at
 * the value), 0 at the closing brace, -1 on error.  *first starts at 1. */
static int next_key(Cursor *c, int *first, const char **key, Py_ssize_t *klen) {
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return 0;
    }
    if (!*first && expect(c, ',') < 0) return -1;
    *first = 0;
    int escaped;
    if (string_span(c, key, klen, &escaped) < 0 || expect(c, ':') < 0) return -1;
    if (escaped) return fail("escaped key left to the Python decoder");
    skip_ws(c);
    return 1;
}

/* [item, ...] or null, each item parsed by `item` into `acc`. */
static int parse_array(Cursor *c, int (*item)(Cursor *, PyObject *), PyObject *acc) {
    skip_ws(c);
    if (c->end - c->p >= 4 && memcmp(c->p, "null", 4) == 0) {
        c->p += 4;
        return 0;
    }
    if (expect(c, '[') < 0) return -1;
    skip_ws(c);
    if (c->p < c->end && *c->p == ']') {
        c->p++;
        return 0;
    }
    for (;;) {
        if (item(c, acc) < 0) return -1;
        skip_ws(c);
        if (c->p < c->end && *c->p == ',') {
            c->p++;
            continue;
        }
        return expect(c, ']');
    }
}

/* -- the parts of a row message ---------------------------------------------------------- */

/* A "name" member's string into *name (replacing one seen before: the last one counts). */
static int read_name(Cursor *c, PyObject **name) {
    const char *s;
    Py_ssize_t n;
    int escaped;
    if (string_span(c, &s, &n, &escaped) < 0) return -1;
    Py_XSETREF(*name, cached_string(s, n, escaped));
    return *name == NULL ? -1 : 0;
}

/* One {"name":..,"type":..,"value":..} into out[name]. */
static int parse_column(Cursor *c, PyObject *out) {
    const char *type = NULL, *value_at = NULL, *key;
    Py_ssize_t tlen = 0, klen;
    PyObject *name = NULL;
    int first = 1, more;
    if (expect(c, '{') < 0) return -1;
    while ((more = next_key(c, &first, &key, &klen)) == 1) {
        if (KEY_IS(key, klen, "name")) {
            if (read_name(c, &name) < 0) goto error;
        } else if (KEY_IS(key, klen, "type")) {
            int e;
            if (string_span(c, &type, &tlen, &e) < 0) goto error;
            if (e) {
                fail("escaped type left to the Python decoder");
                goto error;
            }
        } else {
            if (KEY_IS(key, klen, "value")) value_at = c->p;
            if (skip_value(c, 0) < 0) goto error;
        }
    }
    if (more < 0) goto error;
    if (name == NULL || type == NULL || value_at == NULL) {
        fail("column without name, type or value");
        goto error;
    }
    Cursor at = {value_at, c->end};
    PyObject *value = column_value(&at, type, tlen, classify(type, tlen));
    if (value == NULL) goto error;
    int rc = PyDict_SetItem(out, name, value);
    Py_DECREF(value);
    Py_DECREF(name);
    return rc;
error:
    Py_XDECREF(name);
    return -1;
}

/* One {"name":..,"type":..} of "pk": its name appended to `names`. */
static int parse_pk_column(Cursor *c, PyObject *names) {
    const char *key;
    Py_ssize_t klen;
    PyObject *name = NULL;
    int first = 1, more;
    if (expect(c, '{') < 0) return -1;
    while ((more = next_key(c, &first, &key, &klen)) == 1) {
        if (KEY_IS(key, klen, "name")) {
            if (read_name(c, &name) < 0) goto error;
        } else if (skip_value(c, 0) < 0) {
            goto error;
        }
    }
    if (more < 0) goto error;
    if (name == NULL) {
        fail("primary key column without a name");
        goto error;
    }
    int rc = PyList_Append(names, name);
    Py_DECREF(name);
    return rc;
error:
    Py_XDECREF(name);
    return -1;
}

static PyObject *parse_columns(Cursor *c) {
    PyObject *out = PyDict_New();
    if (out != NULL && parse_array(c, parse_column, out) < 0) Py_CLEAR(out);
    return out;
}

static PyObject *parse_pk(Cursor *c) {
    PyObject *names = PyList_New(0);
    if (names == NULL) return NULL;
    PyObject *tuple = parse_array(c, parse_pk_column, names) < 0 ? NULL : PyList_AsTuple(names);
    Py_DECREF(names);
    return tuple;
}

/* "schema.table", through the cache when both are short and plain. */
static PyObject *table_name(const char *schema, Py_ssize_t slen, int sesc, const char *table, Py_ssize_t tlen,
                            int tesc) {
    if (!sesc && !tesc && slen + tlen + 1 <= CACHE_MAX_LEN) {
        char joined[CACHE_MAX_LEN];
        memcpy(joined, schema, (size_t)slen);
        joined[slen] = '.';
        memcpy(joined + slen + 1, table, (size_t)tlen);
        return cached_string(joined, slen + 1 + tlen, 0);
    }
    PyObject *s = string_value(schema, slen, sesc);
    if (s == NULL) return NULL;
    PyObject *t = string_value(table, tlen, tesc);
    if (t == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    PyObject *joined = PyUnicode_FromFormat("%U.%U", s, t);
    Py_DECREF(s);
    Py_DECREF(t);
    return joined;
}

/* An integer xid of at most `longest` characters as an int; NULL with ValueError for
   anything else (the Python decoder decides). */
static PyObject *xid_value(Cursor *c, Py_ssize_t longest) {
    const char *s;
    Py_ssize_t n;
    int integral;
    char buf[24];
    if (number_span(c, &s, &n, &integral) < 0) return NULL;
    if (!integral || n > longest || n >= (Py_ssize_t)sizeof(buf)) {
        fail("xid left to the Python decoder");
        return NULL;
    }
    memcpy(buf, s, (size_t)n);
    buf[n] = '\0';
    return PyLong_FromString(buf, NULL, 10);
}

/* "16/B374D848" -> *value, for 1 to 8 hex digits on each side: 0; -1 for anything else
   (the Python decoder decides). */
static int lsn_value(const char *s, Py_ssize_t n, unsigned long long *value) {
    unsigned long long hi = 0, lo = 0;
    Py_ssize_t i = 0, digits = 0;
    for (; i < n && s[i] != '/'; i++, digits++) {
        int h = hexval(s[i]);
        if (h < 0 || digits == 8) return -1;
        hi = (hi << 4) | (unsigned)h;
    }
    if (digits == 0 || i == n) return -1;
    digits = 0;
    for (i++; i < n; i++, digits++) {
        int h = hexval(s[i]);
        if (h < 0 || digits == 8) return -1;
        lo = (lo << 4) | (unsigned)h;
    }
    if (digits == 0) return -1;
    *value = (hi << 32) | lo;
    return 0;
}

/* A begin or commit message (the cursor past its "action"), written the way wal2json
   writes one in a UTC session, as `type`(xid, commit_time, lsn, end_lsn); NULL with
   ValueError for anything else (the Python decoder decides, and names the fault). */
static PyObject *decode_edge(PyObject *type, Cursor *c) {
    PyObject *xid = NULL, *stamp = NULL, *result = NULL;
    unsigned long long lsn = 0, next = 0;
    int have_lsn = 0, have_next = 0;
    const char *key;
    Py_ssize_t klen;
    int first = 0, more;
    while ((more = next_key(c, &first, &key, &klen)) == 1) {
        if (KEY_IS(key, klen, "xid")) {
            Py_XSETREF(xid, xid_value(c, 18));
            if (xid == NULL) goto done;
        } else if (KEY_IS(key, klen, "timestamp")) {
            const char *s;
            Py_ssize_t n;
            int e;
            if (string_span(c, &s, &n, &e) < 0) goto done;
            PyObject *iso = e ? NULL : fast_timestamptz(s, n);
            if (iso == NULL) {
                if (!PyErr_Occurred()) fail("timestamp left to the Python decoder");
                goto done;
            }
            Py_XSETREF(stamp, iso);
        } else if (KEY_IS(key, klen, "lsn") || KEY_IS(key, klen, "nextlsn")) {
            const char *s;
            Py_ssize_t n;
            int e;
            if (string_span(c, &s, &n, &e) < 0) goto done;
            unsigned long long value;
            if (e || lsn_value(s, n, &value) < 0) {
                fail("lsn left to the Python decoder");
                goto done;
            }
            if (klen == 3) {
                lsn = value;
                have_lsn = 1;
            } else {
                next = value;
                have_next = 1;
            }
        } else if (KEY_IS(key, klen, "action")) {
            fail("repeated action left to the Python decoder");
            goto done;
        } else if (skip_value(c, 0) < 0) {
            goto done;
        }
    }
    if (more < 0) goto done;
    skip_ws(c);
    if (c->p != c->end) {
        fail("trailing data after the message");
        goto done;
    }
    if (xid == NULL || stamp == NULL || !have_lsn || !have_next) {
        fail("begin or commit without xid, timestamp, lsn or nextlsn");
        goto done;
    }
    PyObject *start = PyLong_FromUnsignedLongLong(lsn), *end = start ? PyLong_FromUnsignedLongLong(next) : NULL;
    if (end != NULL) result = PyObject_CallFunctionObjArgs(type, xid, stamp, start, end, NULL);
    Py_XDECREF(start);
    Py_XDECREF(end);
done:
    Py_XDECREF(xid);
    Py_XDECREF(stamp);
    return result;
}

/* The message of `size` bytes at `data` as a RowChange (or a Begin or Commit, once setup()
   was given them); None when it is none of those; NULL with ValueError when it is one the
   Python decoder must decide (it names the fault). */
static PyObject *decode_buf(const char *data, Py_ssize_t size) {
    if (RowChangeType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_wal2json.setup() was not called");
        return NULL;
    }
    static const char prefix[] = "{\"action\":\"";
    const Py_ssize_t plen = sizeof(prefix) - 1;
    PyObject *op = NULL;
    if (size >= plen + 2 && memcmp(data, prefix, (size_t)plen) == 0 && data[plen + 1] == '"') {
        char action = data[plen];
        PyObject *edge = action == 'B' ? BeginType : action == 'C' ? CommitType : NULL;
        if (edge != NULL) {
            Cursor e = {data + plen + 2, data + size};
            return decode_edge(edge, &e);
        }
        op = action == 'I' ? OpInsert : action == 'U' ? OpUpdate : action == 'D' ? OpDelete : NULL;
    }
    if (op == NULL) Py_RETURN_NONE; /* not a row change, or not written the way wal2json writes one */
    Cursor c = {data + plen + 2, data + size};
    PyObject *xid = NULL, *lsn = NULL, *table = NULL, *new = NULL, *old = NULL, *pk = NULL, *result = NULL;
    const char *schema_raw = NULL, *table_raw = NULL, *key;
    Py_ssize_t schema_len = 0, table_len = 0, klen;
    int schema_esc = 0, table_esc = 0, first = 0, more;
    while ((more = next_key(&c, &first, &key, &klen)) == 1) {
        if (KEY_IS(key, klen, "xid")) {
            Py_XSETREF(xid, xid_value(&c, 20));
            if (xid == NULL) goto done;
        } else if (KEY_IS(key, klen, "lsn")) {
            const char *s;
            Py_ssize_t n;
            int e;
            if (string_span(&c, &s, &n, &e) < 0) goto done;
            Py_XSETREF(lsn, string_value(s, n, e));
            if (lsn == NULL) goto done;
        } else if (KEY_IS(key, klen, "schema")) {
            if (string_span(&c, &schema_raw, &schema_len, &schema_esc) < 0) goto done;
        } else if (KEY_IS(key, klen, "table")) {
            if (string_span(&c, &table_raw, &table_len, &table_esc) < 0) goto done;
        } else if (KEY_IS(key, klen, "columns")) {
            Py_XSETREF(new, parse_columns(&c));
            if (new == NULL) goto done;
        } else if (KEY_IS(key, klen, "identity")) {
            Py_XSETREF(old, parse_columns(&c));
            if (old == NULL) goto done;
        } else if (KEY_IS(key, klen, "pk")) {
            Py_XSETREF(pk, parse_pk(&c));
            if (pk == NULL) goto done;
        } else if (KEY_IS(key, klen, "action")) {
            fail("repeated action left to the Python decoder");
            goto done;
        } else if (skip_value(&c, 0) < 0) {
            goto done;
        }
    }
    if (more < 0) goto done;
    skip_ws(&c);
    if (c.p != c.end) {
        fail("trailing data after the message");
        goto done;
    }
    if (xid == NULL || lsn == NULL || schema_raw == NULL || table_raw == NULL) {
        fail("row message without xid, lsn, schema or table");
        goto done;
    }
    table = table_name(schema_raw, schema_len, schema_esc, table_raw, table_len, table_esc);
    if (table == NULL) goto done;
    if (new == NULL && (new = PyDict_New()) == NULL) goto done;
    if (pk == NULL && (pk = PyTuple_New(0)) == NULL) goto done;
    PyObject *fields = PyTuple_Pack(7, op, table, xid, lsn, new, old ? old : Py_None, pk);
    if (fields == NULL) goto done;
    PyObject *args = PyTuple_Pack(1, fields);
    Py_DECREF(fields);
    if (args == NULL) goto done;
    result = PyTuple_Type.tp_new((PyTypeObject *)RowChangeType, args, NULL); /* RowChange(*fields) */
    Py_DECREF(args);
done:
    Py_XDECREF(xid);
    Py_XDECREF(lsn);
    Py_XDECREF(table);
    Py_XDECREF(new);
    Py_XDECREF(old);
    Py_XDECREF(pk);
    return result;
}

static PyObject *decode_row(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = decode_buf(view.buf, view.len);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *setup(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *rowchange, *convert, *begin = NULL, *commit = NULL;
    if (!PyArg_ParseTuple(args, "OO|OO", &rowchange, &convert, &begin, &commit)) return NULL;
    if ((begin != NULL && !PyCallable_Check(begin)) || (commit != NULL && !PyCallable_Check(commit))) {
        PyErr_SetString(PyExc_TypeError, "setup() needs the Begin and Commit types");
        return NULL;
    }
    if (!PyType_Check(rowchange) || !PyType_IsSubtype((PyTypeObject *)rowchange, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "setup() needs the RowChange tuple type");
        return NULL;
    }
    if (!PyCallable_Check(convert)) {
        PyErr_SetString(PyExc_TypeError, "setup() needs a converter callable");
        return NULL;
    }
    Py_INCREF(rowchange);
    Py_XSETREF(RowChangeType, rowchange);
    Py_INCREF(convert);
    Py_XSETREF(Fallback, convert);
    if (begin != NULL) { /* (left out: as they were) */
        Py_INCREF(begin);
        Py_XSETREF(BeginType, begin);
    }
    if (commit != NULL) {
        Py_INCREF(commit);
        Py_XSETREF(CommitType, commit);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_row", decode_row, METH_O,
     "wal2json v2 row message -> RowChange (a begin or commit: Begin or Commit, once set up), or None."},
    {"setup", setup, METH_VARARGS,
     "setup(RowChange, convert[, Begin, Commit]): the result types and the converter of the rest."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wal2json", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__wal2json(void) {
    OpInsert = PyUnicode_InternFromString("insert");
    OpUpdate = PyUnicode_InternFromString("update");
    OpDelete = PyUnicode_InternFromString("delete");
    if (OpInsert == NULL || OpUpdate == NULL || OpDelete == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    /* for cdc._frames, which decodes rows straight from libpq's buffer */
    PyObject *api = PyCapsule_New((void *)decode_buf, "cdc._wal2json.decode_buf", NULL);
    if (api == NULL || PyModule_AddObject(m, "decode_buf", api) < 0) {
        Py_XDECREF(api);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
