//! megasock library
