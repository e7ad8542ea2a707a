"""The book machinery: a chapter's setup and page, figures, results and claims, building and reading the book."""
