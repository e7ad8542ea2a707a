"""``python -m helpers.book``: execute the chapters and render the book (see :mod:`helpers.book.pipeline`)."""

import sys

from helpers.book.pipeline import main

sys.exit(main())
