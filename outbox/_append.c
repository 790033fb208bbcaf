/* Capture's event inserts on a thread of their own, without the GIL.
 *
 * sqlite3's executemany binds each row's parameters holding the GIL and lets it go only
 * for the row's sqlite3_step: on capture's thread that is a third of its time, and every
 * row needs the GIL back.  An Appender copies a chunk of rows (tuples of str, int, float
 * or None) into one buffer while the caller holds the GIL, and a native thread binds and
 * steps them on the writer's own SQLite connection, never touching Python.  Capture
 * decodes the next rows meanwhile.
 *
 *   Appender(connection, sql, library)      the statement is prepared on the connection
 *   .append(rows)                            copy and queue one chunk; waits (without the
 *                                            GIL) while MAX_QUEUED chunks are queued, so
 *                                            a huge transaction never piles up in memory
 *   .queued() -> int                         chunks queued or being inserted
 *   .execute(sql) -> int                     queue a statement without parameters (the
 *                                            writer's COMMIT and BEGIN): its ticket
 *   .done() -> int                           tickets done: every chunk and statement
 *                                            queued is one, numbered from 1 in order; a
 *                                            failure stops the count until settle()
 *   .wait_statements()                       wait (without the GIL) until no statement is
 *                                            queued or running: a statement holds the
 *                                            connection's mutex throughout (a BEGIN that
 *                                            waits for another writer's lock, a COMMIT's
 *                                            fsync), and a read of the Python side must
 *                                            not wait for that mutex holding the GIL
 *   .settle() -> int                         wait until every queued row is inserted; the
 *                                            connection's last rowid; raises AppendError
 *                                            (message, code, tickets done before it: the
 *                                            first failure, once) if something failed
 *   .close()                                 stop the thread, finalize the statement
 *
 * The connection is the one of a sqlite3.Connection (CPython keeps its sqlite3 handle as
 * the first field: outbox/append.py checks the version before it asks for an Appender,
 * and the file name the handle reports).  `library` is the path of the module that links
 * SQLite (_sqlite3): the functions are looked up through it, so that both sides use the
 * one SQLite of the process.  The handle must be serialized (it has a mutex): the thread
 * holds it around each row, so the Python side may read on the same connection meanwhile.
 * Everything else the writer does on that connection waits for settle() first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;
typedef struct sqlite3_mutex sqlite3_mutex;

#define SQLITE_OK 0
#define SQLITE_DONE 101
#define SQLITE_STATIC ((void (*)(void *))0)

static struct {
    int (*prepare_v2)(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
    int (*bind_text)(sqlite3_stmt *, int, const char *, int, void (*)(void *));
    int (*bind_int64)(sqlite3_stmt *, int, long long);
    int (*bind_double)(sqlite3_stmt *, int, double);
    int (*bind_null)(sqlite3_stmt *, int);
    int (*bind_parameter_count)(sqlite3_stmt *);
    int (*step)(sqlite3_stmt *);
    int (*reset)(sqlite3_stmt *);
    int (*finalize)(sqlite3_stmt *);
    int (*exec)(sqlite3 *, const char *, void *, void *, char **);
    void (*free)(void *);
    const char *(*errmsg)(sqlite3 *);
    int (*extended_errcode)(sqlite3 *);
    long long (*last_insert_rowid)(sqlite3 *);
    const char *(*db_filename)(sqlite3 *, const char *);
    sqlite3_mutex *(*db_mutex)(sqlite3 *);
    void (*mutex_enter)(sqlite3_mutex *);
    void (*mutex_leave)(sqlite3_mutex *);
} api;
static int api_loaded = 0;

static PyObject *AppendError = NULL;

#define MAX_QUEUED 4

enum { V_NULL = 0, V_INT = 1, V_FLOAT = 2, V_TEXT = 3 };

typedef struct {
    int kind;
    int len;            /* V_TEXT: bytes */
    union {
        long long i;
        double f;
        size_t at;      /* V_TEXT: offset into the chunk's text */
    } v;
} Value;

typedef struct Chunk {
    struct Chunk *next;
    Py_ssize_t rows;
    int width;
    Value *values;      /* rows * width */
    char *text;
    char *sql;          /* a statement instead of rows */
} Chunk;

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    sqlite3_stmt *stmt;
    sqlite3_mutex *mutex;
    int width;
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    pthread_cond_t wake;    /* a chunk queued, or stop */
    pthread_cond_t idle;    /* the queue emptied */
    Chunk *head, *tail;
    int busy;               /* the thread is inserting a chunk it took off the queue */
    int queued;             /* chunks queued or being inserted */
    int statements;         /* of which statements */
    int stop;
    int failed;             /* a row failed: the rest is dropped until settle() reports it */
    int error_code;
    char error[512];
    long long last_rowid;
    long long tickets;      /* chunks and statements queued, ever */
    long long done;         /* of which done (in order) */
} Appender;

static void free_chunk(Chunk *c) {
    if (c == NULL)
        return;
    PyMem_RawFree(c->values);
    PyMem_RawFree(c->text);
    PyMem_RawFree(c->sql);
    PyMem_RawFree(c);
}

static int load_api(const char *library) {
    if (api_loaded)
        return 0;
    void *h = dlopen(library, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL) {
        PyErr_Format(PyExc_ImportError, "cannot find SQLite through %s: %s", library, dlerror());
        return -1;
    }
#define LOAD(field, name)                                                                   \
    do {                                                                                    \
        *(void **)(&api.field) = dlsym(h, name);                                            \
        if (api.field == NULL) {                                                            \
            PyErr_Format(PyExc_ImportError, "SQLite's %s is not visible through %s", name, library); \
            return -1;                                                                      \
        }                                                                                   \
    } while (0)
    LOAD(prepare_v2, "sqlite3_prepare_v2");
    LOAD(bind_text, "sqlite3_bind_text");
    LOAD(bind_int64, "sqlite3_bind_int64");
    LOAD(bind_double, "sqlite3_bind_double");
    LOAD(bind_null, "sqlite3_bind_null");
    LOAD(bind_parameter_count, "sqlite3_bind_parameter_count");
    LOAD(step, "sqlite3_step");
    LOAD(reset, "sqlite3_reset");
    LOAD(finalize, "sqlite3_finalize");
    LOAD(exec, "sqlite3_exec");
    LOAD(free, "sqlite3_free");
    LOAD(errmsg, "sqlite3_errmsg");
    LOAD(extended_errcode, "sqlite3_extended_errcode");
    LOAD(last_insert_rowid, "sqlite3_last_insert_rowid");
    LOAD(db_filename, "sqlite3_db_filename");
    LOAD(db_mutex, "sqlite3_db_mutex");
    LOAD(mutex_enter, "sqlite3_mutex_enter");
    LOAD(mutex_leave, "sqlite3_mutex_leave");
#undef LOAD
    api_loaded = 1; /* the handle stays open: _sqlite3 is never unloaded */
    return 0;
}

/* -- the thread ------------------------------------------------------------------------ */

static void record_failure(Appender *self, int code, const char *message) {
    pthread_mutex_lock(&self->lock);
    self->failed = 1;
    self->error_code = code;
    snprintf(self->error, sizeof self->error, "%s", message ? message : "unknown error");
    pthread_mutex_unlock(&self->lock);
}

static int execute_statement(Appender *self, Chunk *c) {
    char *message = NULL;
    api.mutex_enter(self->mutex);
    int rc = api.exec(self->db, c->sql, NULL, NULL, &message);
    if (rc != SQLITE_OK)
        record_failure(self, api.extended_errcode(self->db), message ? message : api.errmsg(self->db));
    api.mutex_leave(self->mutex);
    api.free(message);
    return rc == SQLITE_OK;
}

static int insert_chunk(Appender *self, Chunk *c) {
    sqlite3_stmt *st = self->stmt;
    for (Py_ssize_t r = 0; r < c->rows; r++) {
        Value *row = c->values + r * c->width;
        api.mutex_enter(self->mutex);
        int rc = SQLITE_OK;
        for (int i = 0; i < c->width && rc == SQLITE_OK; i++) {
            Value *v = row + i;
            switch (v->kind) {
            case V_INT: rc = api.bind_int64(st, i + 1, v->v.i); break;
            case V_FLOAT: rc = api.bind_double(st, i + 1, v->v.f); break;
            case V_TEXT: rc = api.bind_text(st, i + 1, c->text + v->v.at, v->len, SQLITE_STATIC); break;
            default: rc = api.bind_null(st, i + 1); break;
            }
        }
        if (rc == SQLITE_OK)
            rc = api.step(st);
        if (rc != SQLITE_DONE) {
            record_failure(self, api.extended_errcode(self->db), api.errmsg(self->db));
            api.reset(st);
            api.mutex_leave(self->mutex);
            return 0;
        }
        api.reset(st);
        long long rowid = api.last_insert_rowid(self->db);
        api.mutex_leave(self->mutex);
        self->last_rowid = rowid; /* read by settle() under self->lock, once the thread is idle */
    }
    return 1;
}

static void *run(void *arg) {
    Appender *self = arg;
    pthread_mutex_lock(&self->lock);
    for (;;) {
        while (self->head == NULL && !self->stop)
            pthread_cond_wait(&self->wake, &self->lock);
        if (self->head == NULL && self->stop)
            break;
        Chunk *c = self->head;
        self->head = c->next;
        if (self->head == NULL)
            self->tail = NULL;
        int skip = self->failed;
        self->busy = 1;
        pthread_mutex_unlock(&self->lock);
        int statement = c->sql != NULL;
        int ok = !skip && (statement ? execute_statement(self, c) : insert_chunk(self, c));
        free_chunk(c);
        pthread_mutex_lock(&self->lock);
        if (ok)
            self->done++;
        if (statement)
            self->statements--;
        self->busy = 0;
        self->queued--;
        pthread_cond_broadcast(&self->idle); /* room for a chunk, or the queue emptied */
    }
    pthread_mutex_unlock(&self->lock);
    return NULL;
}

/* -- the Python side --------------------------------------------------------------------- */

static int Appender_init(Appender *self, PyObject *args, PyObject *kwds) {
    PyObject *conn;
    const char *sql, *library;
    static char *kwlist[] = {"connection", "sql", "library", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oss", kwlist, &conn, &sql, &library))
        return -1;
    if (self->db != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Appender already initialised");
        return -1;
    }
    if (load_api(library) < 0)
        return -1;
    sqlite3 *db = *(sqlite3 **)((char *)conn + sizeof(PyObject));
    if (db == NULL) {
        PyErr_SetString(PyExc_ValueError, "the connection is closed");
        return -1;
    }
    sqlite3_mutex *mutex = api.db_mutex(db);
    if (mutex == NULL) {
        PyErr_SetString(PyExc_ValueError, "the connection is not serialized (no mutex)");
        return -1;
    }
    sqlite3_stmt *stmt = NULL;
    int rc = api.prepare_v2(db, sql, -1, &stmt, NULL);
    if (rc != SQLITE_OK) {
        PyErr_Format(AppendError, "%s", api.errmsg(db));
        return -1;
    }
    self->db = db;
    self->stmt = stmt;
    self->mutex = mutex;
    self->width = api.bind_parameter_count(stmt);
    pthread_mutex_init(&self->lock, NULL);
    pthread_cond_init(&self->wake, NULL);
    pthread_cond_init(&self->idle, NULL);
    if (pthread_create(&self->thread, NULL, run, self) != 0) {
        api.finalize(stmt);
        self->stmt = NULL;
        PyErr_SetString(PyExc_OSError, "cannot start the append thread");
        return -1;
    }
    self->started = 1;
    return 0;
}

static PyObject *Appender_filename(Appender *self, PyObject *Py_UNUSED(unused)) {
    if (self->db == NULL)
        Py_RETURN_NONE;
    const char *name = api.db_filename(self->db, "main");
    if (name == NULL)
        Py_RETURN_NONE;
    return PyUnicode_DecodeFSDefault(name);
}

/* Copy one chunk of rows; NULL with an exception set for a value it does not take. */
static Chunk *copy_rows(Appender *self, PyObject *rows) {
    PyObject *seq = PySequence_Fast(rows, "rows must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int width = self->width;
    Chunk *c = PyMem_RawCalloc(1, sizeof(Chunk));
    Value *values = c ? PyMem_RawCalloc((size_t)(n ? n : 1) * width, sizeof(Value)) : NULL;
    size_t cap = 4096, used = 0;
    char *text = values ? PyMem_RawMalloc(cap) : NULL;
    if (text == NULL) {
        PyMem_RawFree(values);
        PyMem_RawFree(c);
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    c->rows = n;
    c->width = width;
    c->values = values;
    c->text = text;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *row = items[r];
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != width) {
            PyErr_Format(PyExc_TypeError, "row %zd is not a tuple of %d values", r, width);
            goto fail;
        }
        for (int i = 0; i < width; i++) {
            PyObject *o = PyTuple_GET_ITEM(row, i);
            Value *v = values + r * width + i;
            if (o == Py_None) {
                v->kind = V_NULL;
            } else if (PyUnicode_CheckExact(o)) {
                Py_ssize_t len;
                const char *s = PyUnicode_AsUTF8AndSize(o, &len);
                if (s == NULL)
                    goto fail;
                if (len > INT32_MAX) {
                    PyErr_SetString(PyExc_OverflowError, "a value of 2 GiB or more");
                    goto fail;
                }
                if (used + (size_t)len > cap) {
                    while (used + (size_t)len > cap)
                        cap *= 2;
                    char *grown = PyMem_RawRealloc(c->text, cap);
                    if (grown == NULL) {
                        PyErr_NoMemory();
                        goto fail;
                    }
                    c->text = grown;
                }
                memcpy(c->text + used, s, (size_t)len);
                v->kind = V_TEXT;
                v->len = (int)len;
                v->v.at = used;
                used += (size_t)len;
            } else if (PyLong_CheckExact(o)) {
                int overflow;
                long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
                if (overflow || (x == -1 && PyErr_Occurred())) {
                    PyErr_Clear();
                    PyErr_Format(PyExc_TypeError, "row %zd value %d: an integer past 64 bits", r, i);
                    goto fail;
                }
                v->kind = V_INT;
                v->v.i = x;
            } else if (PyFloat_CheckExact(o)) {
                v->kind = V_FLOAT;
                v->v.f = PyFloat_AS_DOUBLE(o);
            } else {
                PyErr_Format(PyExc_TypeError, "row %zd value %d: %.80s is not taken",
                             r, i, Py_TYPE(o)->tp_name);
                goto fail;
            }
        }
    }
    Py_DECREF(seq);
    return c;
fail:
    Py_DECREF(seq);
    free_chunk(c);
    return NULL;
}

static long long enqueue(Appender *self, Chunk *c);

static PyObject *Appender_append(Appender *self, PyObject *rows) {
    if (self->stmt == NULL) {
        PyErr_SetString(PyExc_ValueError, "the appender is closed");
        return NULL;
    }
    Chunk *c = copy_rows(self, rows);
    if (c == NULL)
        return NULL;
    if (c->rows == 0) {
        free_chunk(c);
        Py_RETURN_NONE;
    }
    enqueue(self, c);
    Py_RETURN_NONE;
}

/* Queue a chunk (the caller holds the GIL); wait, without it, while the queue is full. */
static long long enqueue(Appender *self, Chunk *c) {
    pthread_mutex_lock(&self->lock);
    if (self->tail)
        self->tail->next = c;
    else
        self->head = c;
    self->tail = c;
    self->queued++;
    if (c->sql != NULL)
        self->statements++;
    long long ticket = ++self->tickets;
    int full = self->queued > MAX_QUEUED;
    pthread_cond_signal(&self->wake);
    pthread_mutex_unlock(&self->lock);
    if (full) { /* (the GIL is never taken while holding self->lock) */
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&self->lock);
        while (self->queued > MAX_QUEUED)
            pthread_cond_wait(&self->idle, &self->lock);
        pthread_mutex_unlock(&self->lock);
        Py_END_ALLOW_THREADS
    }
    return ticket;
}

static PyObject *Appender_execute(Appender *self, PyObject *sql) {
    if (self->stmt == NULL) {
        PyErr_SetString(PyExc_ValueError, "the appender is closed");
        return NULL;
    }
    Py_ssize_t len;
    const char *text = PyUnicode_AsUTF8AndSize(sql, &len);
    if (text == NULL)
        return NULL;
    Chunk *c = PyMem_RawCalloc(1, sizeof(Chunk));
    char *copy = c ? PyMem_RawMalloc((size_t)len + 1) : NULL;
    if (copy == NULL) {
        PyMem_RawFree(c);
        return PyErr_NoMemory();
    }
    memcpy(copy, text, (size_t)len + 1);
    c->sql = copy;
    return PyLong_FromLongLong(enqueue(self, c));
}

static PyObject *Appender_done(Appender *self, PyObject *Py_UNUSED(unused)) {
    pthread_mutex_lock(&self->lock);
    long long done = self->done;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromLongLong(done);
}

static PyObject *Appender_wait_statements(Appender *self, PyObject *Py_UNUSED(unused)) {
    pthread_mutex_lock(&self->lock);
    int running = self->statements > 0;
    pthread_mutex_unlock(&self->lock);
    if (!running) /* (the usual case: the GIL stays, no other thread is let in) */
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    while (self->statements > 0)
        pthread_cond_wait(&self->idle, &self->lock);
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void wait_idle(Appender *self) {
    pthread_mutex_lock(&self->lock);
    int idle = self->head == NULL && !self->busy;
    pthread_mutex_unlock(&self->lock);
    if (idle)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    while (self->head != NULL || self->busy)
        pthread_cond_wait(&self->idle, &self->lock);
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
}

static PyObject *Appender_settle(Appender *self, PyObject *Py_UNUSED(unused)) {
    if (self->stmt == NULL) {
        PyErr_SetString(PyExc_ValueError, "the appender is closed");
        return NULL;
    }
    wait_idle(self);
    pthread_mutex_lock(&self->lock);
    int failed = self->failed;
    int code = self->error_code;
    char error[sizeof self->error];
    memcpy(error, self->error, sizeof error);
    long long last = self->last_rowid;
    long long done = self->done; /* (before the failure: what was done stays done) */
    if (failed)
        self->done = self->tickets; /* what failed or was dropped is over: told once, here */
    self->failed = 0;
    pthread_mutex_unlock(&self->lock);
    if (failed) {
        PyObject *exc = Py_BuildValue("(siL)", error, code, done);
        if (exc != NULL) {
            PyErr_SetObject(AppendError, exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    return PyLong_FromLongLong(last);
}

static PyObject *Appender_queued(Appender *self, PyObject *Py_UNUSED(unused)) {
    pthread_mutex_lock(&self->lock);
    int queued = self->queued;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromLong(queued);
}

static void stop_thread(Appender *self) {
    if (!self->started)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    self->stop = 1;
    pthread_cond_signal(&self->wake);
    pthread_mutex_unlock(&self->lock);
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->started = 0;
    while (self->head) {
        Chunk *c = self->head;
        self->head = c->next;
        free_chunk(c);
    }
    self->tail = NULL;
    self->queued = 0;
    self->statements = 0;
}

static PyObject *Appender_close(Appender *self, PyObject *Py_UNUSED(unused)) {
    stop_thread(self);
    if (self->stmt != NULL) {
        api.finalize(self->stmt);
        self->stmt = NULL;
    }
    Py_RETURN_NONE;
}

static void Appender_dealloc(Appender *self) {
    /* close() finalizes on the connection's owner; here the connection may be gone,
       so a statement left open is leaked rather than finalized */
    stop_thread(self);
    if (self->db != NULL) {
        pthread_mutex_destroy(&self->lock);
        pthread_cond_destroy(&self->wake);
        pthread_cond_destroy(&self->idle);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Appender_methods[] = {
    {"append", (PyCFunction)Appender_append, METH_O, "Copy and queue one chunk of rows."},
    {"settle", (PyCFunction)Appender_settle, METH_NOARGS,
     "Wait until every queued row is inserted; the connection's last rowid."},
    {"execute", (PyCFunction)Appender_execute, METH_O, "Queue a statement; its ticket."},
    {"done", (PyCFunction)Appender_done, METH_NOARGS, "Tickets done, in order."},
    {"wait_statements", (PyCFunction)Appender_wait_statements, METH_NOARGS,
     "Wait, without the GIL, until no statement is queued or running."},
    {"queued", (PyCFunction)Appender_queued, METH_NOARGS, "Chunks queued or being inserted."},
    {"close", (PyCFunction)Appender_close, METH_NOARGS, "Stop the thread, finalize the statement."},
    {"filename", (PyCFunction)Appender_filename, METH_NOARGS, "The file the handle has open."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "outbox._append.Appender",
    .tp_basicsize = sizeof(Appender),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Appender_init,
    .tp_dealloc = (destructor)Appender_dealloc,
    .tp_methods = Appender_methods,
    .tp_doc = "Inserts chunks of rows on a native thread, on a sqlite3.Connection's handle.",
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "outbox._append",
    "Capture's event inserts on a native thread (see outbox/append.py).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__append(void) {
    if (PyType_Ready(&AppenderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    AppendError = PyErr_NewException("outbox._append.AppendError", NULL, NULL);
    if (AppendError == NULL || PyModule_AddObjectRef(m, "AppendError", AppendError) < 0 ||
        PyModule_AddObjectRef(m, "Appender", (PyObject *)&AppenderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
